"""Affine round-to-nearest quantization: the simple baseline palettization is compared with.

Each block of `block` consecutive inputs of a row shares a float16 scale and minimum; values
round to the nearest of `2**bits` evenly spaced levels (what llama.cpp's Q4_1 does with blocks
of 32). Used for comparisons at matching bits per weight, so it returns the dense result.
"""

from __future__ import annotations

import torch


def affine_round_to_nearest(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """The weight after affine `bits`-bit quantization in blocks of `block` inputs."""
    out_features, in_features = weight.shape
    if in_features % block:
        raise ValueError(f"block {block} does not divide the row length {in_features}")
    w = weight.detach().float().reshape(out_features, in_features // block, block)
    low = w.amin(dim=-1, keepdim=True).to(torch.float16).float()
    levels = (1 << bits) - 1
    step = ((w.amax(dim=-1, keepdim=True) - low) / levels).clamp(min=1e-8)
    step = step.to(torch.float16).float().clamp(min=1e-8)
    q = torch.round((w - low) / step).clamp(0, levels)
    return (q * step + low).reshape(out_features, in_features)


def affine_bits_per_weight(bits: int, block: int) -> float:
    """Storage per weight: the index plus a float16 scale and minimum per block."""
    return bits + 32 / block
