"""Int8 activations, to measure what quantizing every projection's input per token would cost."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from openafm.model import Linear, Transformer


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round each token's vector to `bits`-bit symmetric integers (one scale per token)."""
    top = (1 << (bits - 1)) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True) / top).clamp(min=1e-8)
    return torch.round(x / scale).clamp(-top, top) * scale


@contextmanager
def int8_activations(model: Transformer) -> Iterator[None]:
    """Inside the block, every projection sees its input rounded to int8 per token."""
    handles = [
        module.register_forward_pre_hook(lambda _m, args: (fake_quantize_per_token(args[0]),))
        for module in model.modules()
        if isinstance(module, Linear)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
