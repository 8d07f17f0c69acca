"""Compress a dense model end to end: calibrate, palettize at each allowed width, allocate, pack.

1. Calibration text gives each projection's input statistic `XᵀX`.
2. Every projection is palettized at every allowed bit width (k-means tables + GPTQ rounding).
3. With more than one width, each candidate's sensitivity (KLD rise alone) and cost (bytes,
   one-token latency) is measured and `allocate_bits` meets the bits-per-weight target at the
   least total sensitivity; with one width every projection takes it.
4. The chosen candidates replace the dense weights and the embedding becomes 8-bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from openafm.compress.allocate import OperationCost, allocate_bits, measure_costs
from openafm.compress.calibration import input_hessians, projection_names, text_windows
from openafm.compress.palettize import BIT_WIDTHS, PalettizeConfig, palettize
from openafm.io.compressed_checkpoint import quantize_embedding
from openafm.model import Transformer
from openafm.model.compressed import PalettizedWeight
from openafm.tokenizer import Tokenizer

DEFAULT_CALIBRATION = Path(__file__).parent / "assets" / "wikitext2_valid_head.txt"

Progress = Callable[[str, int, int], None]
"""`(stage, done, total)`: called as work advances."""


@dataclass(frozen=True)
class CompressConfig:
    """What `compress_model` makes: the bits budget, the allowed widths, and how it calibrates."""

    target_bpw: float = 4.0
    bit_widths: tuple[int, ...] = (2, 3, 4)
    palettize: PalettizeConfig = field(default_factory=PalettizeConfig)
    calibration_tokens: int = 16384
    window: int = 512
    sensitivity_tokens: int = 256
    embedding_int8: bool = True

    def __post_init__(self) -> None:
        if not self.bit_widths or any(b not in BIT_WIDTHS for b in self.bit_widths):
            raise ValueError(f"bit widths must be among {BIT_WIDTHS}, not {self.bit_widths}")
        if not self.target_bpw > 0:
            raise ValueError("the bits-per-weight target must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CompressionResult:
    model: Transformer
    bits: dict[str, int]
    costs: list[OperationCost]  # every measured candidate (empty with one width)


def compress_model(
    model: Transformer,
    tokenizer: Tokenizer,
    calibration: str | Path,
    config: CompressConfig,
    *,
    bits_plan: Mapping[str, int] | None = None,
    progress: Progress | None = None,
) -> CompressionResult:
    """Compress `model` in place (its dense projection weights are dropped) and report how.

    `bits_plan` (bits per projection, e.g. a saved recipe) skips the allocation.
    """
    report = progress or (lambda stage, done, total: None)
    names = projection_names(model)
    modules = dict(model.named_modules())
    for name in names:
        rows = modules[name].out_features
        if rows % config.palettize.group_size:
            raise ValueError(
                f"group size {config.palettize.group_size} does not divide the {rows} rows"
                f" of {name}"
            )
    widths = sorted(set(config.bit_widths))
    if bits_plan is not None:
        if sorted(bits_plan) != sorted(names):
            raise ValueError("the bits plan does not name exactly this model's projections")
        wanted = [(bits_plan[n], n) for n in names]
    else:
        _check_reachable(model, names, config, widths)
        wanted = [(b, n) for b in widths for n in names]
    window = min(config.window, model.config.max_seq_len)
    windows = text_windows(
        tokenizer, calibration, window=window, max_tokens=config.calibration_tokens
    )
    report("calibrating", 0, len(windows))
    hessians = input_hessians(model, windows)
    report("calibrating", len(windows), len(windows))
    candidates: dict[str, dict[int, PalettizedWeight]] = {n: {} for n in names}
    total = len(wanted)
    for i, (bits, name) in enumerate(wanted):
        settings = replace(config.palettize, bits=bits)
        candidates[name][bits] = palettize(modules[name].weight, settings, hessians[name])
        report("palettizing", i + 1, total)
    del hessians
    costs: list[OperationCost] = []
    if bits_plan is not None:
        bits = dict(bits_plan)
    elif len(widths) == 1:
        bits = dict.fromkeys(names, widths[0])
    else:
        probe = text_windows(
            tokenizer, calibration, window=config.sensitivity_tokens, max_tokens=None
        )[-1:]
        done = [0]

        def step() -> None:
            done[0] += 1
            report("measuring sensitivity", done[0], total)

        costs = measure_costs(model, candidates, probe, on_step=step)
        bits = allocate_bits(costs, config.target_bpw)
    for name in names:
        modules[name].compress(candidates[name][bits[name]])
    if config.embedding_int8:
        quantize_embedding(model)
    model.eval().requires_grad_(False)
    return CompressionResult(model, bits, costs)


def _check_reachable(
    model: Transformer, names: list[str], config: CompressConfig, widths: list[int]
) -> None:
    """Refuse a target no allocation of the allowed widths can meet, before any heavy work."""
    modules = dict(model.named_modules())
    narrowest = replace(config.palettize, bits=widths[0])
    weights = stored = 0.0
    for name in names:
        out, inp = modules[name].out_features, modules[name].in_features
        weights += out * inp
        stored += narrowest.bits_per_weight(out, inp) * out * inp
    if stored / weights > config.target_bpw:
        raise ValueError(
            f"a target of {config.target_bpw} bits per weight cannot be met with widths"
            f" {widths}: the narrowest allocation needs {stored / weights:.3f}"
        )
