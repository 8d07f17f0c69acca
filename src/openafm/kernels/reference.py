"""Pure-PyTorch references of the native operators: same arguments, same results.

They define what each kernel computes; the tests hold every native path to them, and they are
the fallback where the native library cannot be built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from openafm.kernels.repack import unpack

if TYPE_CHECKING:
    from openafm.kernels.decoder import StackLayer, StackProjection, StackShape


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
    int8_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`x Wᵀ` for the palettized W (float32). With `int8_tables` (uint8 entries + 128, a step
    per group), W takes the int8 tables' values and x is rounded to int16 per row
    (`int16_rows`): what the integer kernel computes."""
    if int8_tables is not None:
        entries, step = int8_tables
        tables = ((entries.float() - 128) * step.repeat_interleave(1 << bits)).contiguous()
        x = int16_rows(x.float())
    w = lut_dequantize(planes, tables, scale, bits, group, out_features, x.shape[-1])
    return F.linear(x.float(), w)


def int16_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row rounded to a multiple of its largest magnitude / 16383 (the integer kernels'
    activations)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    step = torch.where(amax > 0, amax / 16383, torch.ones_like(amax))
    return torch.round(x * (1.0 / step)) * step


def int8_linear(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x Vᵀ · scale` for int8 rows V with one float scale per row (float32)."""
    return F.linear(x.float(), values.float()) * scale.float()


def low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """An unmerged LoRA update `scale · (x Aᵀ) Bᵀ` in float32 (factors float32 or bfloat16)."""
    return F.linear(F.linear(x.float(), a.float()), b.float()) * scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, times `weight` (float32)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin`, where rotate_half(x) = (-x2, x1) for halves x1, x2
    (the model's own formula when the native path does not apply)."""
    first, second = x.chunk(2, dim=-1)  # (no shape arithmetic: traces for export)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def decoder_stack(
    h: torch.Tensor,
    layers: list[StackLayer],
    shape: StackShape,
    keys: torch.Tensor,
    values: torch.Tensor,
    pos: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """Every decoder layer on the T new tokens `h` (T, dim) of one sequence: the model's own
    computation (pre-norm attention and SwiGLU blocks), writing keys and values at positions
    `pos`..`pos+T-1` of the cache `(layers, 1, kv_heads, max_len, head_dim)`."""
    t, hd, eps = h.shape[0], shape.head_dim, shape.eps
    end = pos + t
    cos, sin = cos.view(1, 1, t, hd), sin.view(1, 1, t, hd)
    sees = torch.arange(end).unsqueeze(0) <= torch.arange(pos, end).unsqueeze(1)
    x = h.float()
    for i, layer in enumerate(layers):
        normed = rms_norm(x, layer.attn_norm, eps)
        q, k, v = (
            _product(normed, p).view(t, -1, hd).transpose(0, 1).unsqueeze(0)
            for p in layer.projections[:3]
        )
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps)
        keys[i, :, :, pos:end] = rope(k, cos, sin)
        values[i, :, :, pos:end] = v
        out = F.scaled_dot_product_attention(
            rope(q, cos, sin),
            keys[i, :, :, :end],
            values[i, :, :, :end],
            attn_mask=sees,
            enable_gqa=True,
        )
        x = x + _product(out.transpose(1, 2).reshape(t, -1), layer.projections[3])
        normed = rms_norm(x, layer.mlp_norm, eps)
        gate, up = (_product(normed, p) for p in layer.projections[4:6])
        x = x + _product(F.silu(gate) * up, layer.projections[6])
    return x


def _product(x: torch.Tensor, projection: StackProjection) -> torch.Tensor:
    y = lut_linear(x, *projection.weight, int8_tables=projection.int8_tables)
    return y if projection.lora is None else y + low_rank(x, *projection.lora)
