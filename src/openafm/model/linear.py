"""The one linear seam: every projection in the model is this module.

Compression (lookup-table weights) and adapters (LoRA) attach here and nowhere else, so the
attention and MLP code never changes. It subclasses `nn.Linear` so PyTorch's tensor-parallel
styles (`ColwiseParallel`, `RowwiseParallel`) apply to it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openafm import kernels
from openafm.model.compressed import Int8Rows, PalettizedWeight, finish_native

CompressedWeight = PalettizedWeight | Int8Rows

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


@dataclass
class LowRankDelta:
    """An unmerged low-rank update `scale · (x Aᵀ) Bᵀ` added to a projection's output (LoRA).

    One update for the whole batch has `a` of shape (rank, in) and `b` of shape (out, rank); one
    per batch row has (batch, rank, in) and (batch, out, rank), rows without an adapter holding
    zeros. `scale` is a number, or a (batch, 1, 1) tensor for per-row scales.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float | torch.Tensor = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)  # factors may be held in bfloat16
        if a.dim() == 2:
            y = F.linear(F.linear(x, a), b)
        else:
            y = torch.matmul(torch.matmul(x, a.transpose(-1, -2)), b.transpose(-1, -2))
        if isinstance(self.scale, float) and self.scale == 1.0:
            return y
        return y * self.scale


class Linear(nn.Linear):
    """`y = x W^T (+ delta)` (no bias by default); the single place projections are computed.

    `W` is the dense `weight`, or, once `compress` has run, a `compressed` submodule (lookup
    tables or int8 rows) and no dense weight at all. `delta` is an optional `LowRankDelta` (an
    adapter); it is a plain attribute, not a submodule, so attaching or swapping one changes
    neither the state dict nor the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.delta: LowRankDelta | None = None
        self.compressed: CompressedWeight | None
        self.register_module("compressed", None)

    def compress(self, weight: CompressedWeight) -> None:
        """Compute with `weight` from now on; the dense weight is dropped."""
        if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"compressed weight is {weight.out_features}x{weight.in_features}, the projection"
                f" {self.out_features}x{self.in_features}"
            )
        self.weight = None
        self.compressed = weight

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense matrix (a transient copy when compressed)."""
        if self.compressed is not None:
            return self.compressed.dequantize(dtype or torch.float32)
        return self.weight if dtype is None else self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compressed is not None:
            y = self.compressed.linear(x, self.delta)
            return y if self.bias is None else y + self.bias
        if _use_onednn(x, self.weight):
            y = _ONEDNN_LINEAR(x, self.weight, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.delta is not None:
            y = y + self.delta(x)
        return y


def project(x: torch.Tensor, *projections: Linear) -> tuple[torch.Tensor, ...]:
    """The outputs of several projections of the same input (q/k/v, gate/up).

    When every one is palettized and computes natively (inference, a few rows, no hooks), they
    run as one native call: one dispatch and one parallel region instead of one each. Otherwise
    each projection is called as usual.
    """
    plans = []
    for p in projections:
        if not isinstance(p.compressed, PalettizedWeight) or p.bias is not None:
            break
        if p._forward_hooks or p._forward_pre_hooks:
            break
        plan = p.compressed.native_product(x, p.delta)
        if plan is None:
            break
        plans.append(plan)
    else:
        weights, loras, tables8 = zip(*plans, strict=True)
        ys = kernels.lut_linear_many(x.float(), list(weights), list(loras), list(tables8))
        return tuple(
            finish_native(y, x, p.delta, lora)
            for y, p, lora in zip(ys, projections, loras, strict=True)
        )
    return tuple(p(x) for p in projections)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Float32 inference on CPU runs on oneDNN's kernel, the one PyTorch's compiler uses.

    Measured here (AVX-512, 2 threads, the default base's shapes, row-major weights): one-token
    products stream about 20% faster than `F.linear` (MKL) and up to twice as fast for 2-8 rows;
    256-row products about 10% faster. Training (autograd), autocast's mixed dtypes, other
    devices, sharded (DTensor) weights and tracing (for export) keep `F.linear`.
    """
    return (
        _ONEDNN_LINEAR is not None
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.is_contiguous()
    )
