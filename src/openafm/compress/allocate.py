"""Bits per operation: measure what each projection costs and how much it hurts, then choose.

Sensitivity of a projection at `b` bits is the mean per-token KL divergence from the float
model on calibration text when only that projection is palettized to `b` bits. Cost is the
bytes its weights occupy (what a decode step streams) and the time its product takes in the
runtime for one token. `allocate_bits` then picks bits per projection meeting an average
bits-per-weight budget at the least total sensitivity (sensitivities add up, to first order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from openafm.model import Transformer
from openafm.model.compressed import PalettizedWeight
from openafm.model.linear import Linear


class AllocationError(ValueError):
    """A budget the allowed bit widths cannot meet."""


@dataclass(frozen=True)
class OperationCost:
    """One projection at one bit width."""

    name: str
    bits: int
    weights: int  # number of weights
    storage_bits: int  # indices, tables and scales
    sensitivity: float  # mean KLD rise with only this projection at these bits
    seconds: float  # one-token product in the runtime (median)

    @property
    def bpw(self) -> float:
        return self.storage_bits / self.weights


@torch.no_grad()
def _log_probs(model: Transformer, windows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [F.log_softmax(model(w)[0].float(), dim=-1) for w in windows]


@torch.no_grad()
def kld_from(
    model: Transformer, windows: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> float:
    """Mean per-token KL(reference ‖ model) over the windows."""
    total, count = 0.0, 0
    for tokens, ref in zip(windows, reference, strict=True):
        logp = F.log_softmax(model(tokens)[0].float(), dim=-1)
        total += float((ref.exp() * (ref - logp)).sum())
        count += ref.shape[0]
    return total / count


def time_product(weight: PalettizedWeight, repeats: int = 5) -> float:
    """Median seconds of one-token products with this weight, as decode runs it."""
    x = torch.randn(1, 1, weight.in_features)
    weight.linear(x)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        weight.linear(x)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


@torch.no_grad()
def measure_costs(
    model: Transformer,
    candidates: Mapping[str, Mapping[int, PalettizedWeight]],
    windows: Sequence[torch.Tensor],
    *,
    on_step: Callable[[], None] | None = None,
) -> list[OperationCost]:
    """Sensitivity and cost of every candidate (projection, bits) of a dense `model`."""
    reference = _log_probs(model, windows)
    modules = dict(model.named_modules())
    costs = []
    for name, by_bits in candidates.items():
        module = modules[name]
        assert isinstance(module, Linear) and module.weight is not None
        dense = module.weight
        try:
            for bits, weight in by_bits.items():
                module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
                costs.append(
                    OperationCost(
                        name=name,
                        bits=bits,
                        weights=weight.in_features * weight.out_features,
                        storage_bits=weight.storage_bits(),
                        sensitivity=kld_from(model, windows, reference),
                        seconds=time_product(weight),
                    )
                )
                if on_step is not None:
                    on_step()
        finally:
            module.weight = dense
    return costs


def allocate_bits(costs: Sequence[OperationCost], target_bpw: float) -> dict[str, int]:
    """Bits per projection with average storage ≤ `target_bpw` at the least total sensitivity.

    Greedy on the marginal rate: start every projection at its widest option, then keep taking
    the step down (to any narrower option) that loses the least sensitivity per bit saved,
    until the budget is met.
    """
    by_name: dict[str, dict[int, OperationCost]] = {}
    for cost in costs:
        by_name.setdefault(cost.name, {})[cost.bits] = cost
    total_weights = sum(next(iter(c.values())).weights for c in by_name.values())
    budget = target_bpw * total_weights
    lowest = sum(min(c.storage_bits for c in options.values()) for options in by_name.values())
    if lowest > budget:
        raise AllocationError(
            f"a budget of {target_bpw} bits per weight is below what the allowed widths reach"
            f" ({lowest / total_weights:.3f} with every projection at its narrowest)"
        )
    choice = {name: max(options) for name, options in by_name.items()}
    used = sum(by_name[n][b].storage_bits for n, b in choice.items())
    while used > budget:
        best: tuple[float, str, int] | None = None
        for name, bits in choice.items():
            current = by_name[name][bits]
            for narrower, option in by_name[name].items():
                saved = current.storage_bits - option.storage_bits
                if narrower >= bits or saved <= 0:
                    continue
                rate = (option.sensitivity - current.sensitivity) / saved
                if best is None or rate < best[0]:
                    best = (rate, name, narrower)
        assert best is not None
        _, name, narrower = best
        used -= by_name[name][choice[name]].storage_bits - by_name[name][narrower].storage_bits
        choice[name] = narrower
    return choice


def allocation_report(bits: dict[str, int], costs: list[OperationCost]) -> list[dict[str, Any]]:
    """Per projection: chosen bits, bytes, sensitivity there and share of one-token latency."""
    chosen = {(c.name, c.bits): c for c in costs}
    seconds = sum(chosen[n, b].seconds for n, b in bits.items() if (n, b) in chosen)
    rows = []
    for name, b in bits.items():
        cost = chosen.get((name, b))
        rows.append(
            {
                "name": name,
                "bits": b,
                "bytes": None if cost is None else cost.storage_bits // 8,
                "bpw": None if cost is None else round(cost.bpw, 4),
                "sensitivity": None if cost is None else cost.sensitivity,
                "latency_share": None if cost is None or not seconds else cost.seconds / seconds,
            }
        )
    return rows
