"""Pure-PyTorch references of the native operators: same arguments, same results.

They define what each kernel computes; the tests hold every native path to them, and they are
the fallback where the native library cannot be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openafm.kernels.repack import unpack


def lut_dequantize(
    planes: torch.Tensor,
    tables: torch.Tensor,
    scale: torch.Tensor | None,
    bits: int,
    group: int,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """The dense float32 matrix: row r is `scale[r] · tables[r // group][indices[r]]`."""
    idx = unpack(planes, bits, out_features, in_features)
    rows = torch.arange(out_features).unsqueeze(1) // group
    w = tables.view(-1, 1 << bits)[rows, idx]
    return w if scale is None else w * scale.unsqueeze(1)


def lut_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    tables: torch.Tensor,
    scale: torch.Tensor | None,
    bits: int,
    group: int,
    out_features: int,
) -> torch.Tensor:
    """`x Wᵀ` for the palettized W (float32)."""
    w = lut_dequantize(planes, tables, scale, bits, group, out_features, x.shape[-1])
    return F.linear(x.float(), w)


def int8_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x Vᵀ · scale` for int8 rows V with one float scale per row (float32)."""
    return F.linear(x.float(), values.float()) * scale.float()


def low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """An unmerged LoRA update `scale · (x Aᵀ) Bᵀ` (float32)."""
    return F.linear(F.linear(x.float(), a), b) * scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, times `weight` (float32)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin`, where rotate_half(x) = (-x2, x1) for halves x1, x2
    (the model's own formula when the native path does not apply)."""
    first, second = x.chunk(2, dim=-1)  # (no shape arithmetic: traces for export)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
