"""Calibration statistics: what text excites each projection's inputs (`H = XᵀX` per projection)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from openafm.model import Transformer
from openafm.model.linear import Linear
from openafm.tokenizer import Tokenizer

# Projections that read the same input share one statistic.
SHARED_INPUT = {"attn.k": "attn.q", "attn.v": "attn.q", "mlp.up": "mlp.gate"}


class CalibrationError(ValueError):
    """Calibration text that cannot be used."""


def text_windows(
    tokenizer: Tokenizer, path: str | Path, *, window: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Consecutive token windows `(1, window)` of a text file (at most `max_tokens` tokens)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration text not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < window:
        raise CalibrationError(
            f"{path}: {len(ids)} tokens, fewer than one window of {window}"
            + (" (the file is empty)" if not text.strip() else "")
        )
    return [
        torch.tensor(ids[i : i + window]).unsqueeze(0)
        for i in range(0, len(ids) - window + 1, window)
    ]


def projection_names(model: Transformer) -> list[str]:
    """Module paths of every block projection (the output head is not among them)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, Linear) and name.startswith("layers.")
    ]


def shared_source(name: str) -> str:
    """The projection whose input statistic `name` uses (itself unless it shares an input)."""
    prefix, _, local = name.partition(".attn.") if ".attn." in name else name.partition(".mlp.")
    kind = "attn." if ".attn." in name else "mlp."
    source = SHARED_INPUT.get(kind + local)
    return f"{prefix}.{source}" if source else name


@torch.no_grad()
def input_hessians(model: Transformer, windows: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """`XᵀX` (float32, summed over calibration tokens) for each projection, keyed by module path.

    Projections reading the same input (q/k/v, gate/up) share one tensor.
    """
    modules = dict(model.named_modules())
    sources = sorted({shared_source(n) for n in projection_names(model)})
    stats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def accumulate(_module, inputs, _output) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            if name in stats:
                stats[name].addmm_(x.T, x)
            else:
                stats[name] = x.T @ x

        return accumulate

    handles = [modules[n].register_forward_hook(hook(n)) for n in sources]
    try:
        for tokens in windows:
            model(tokens, last_only=True)
    finally:
        for handle in handles:
            handle.remove()
    return {n: stats[shared_source(n)] for n in projection_names(model)}
