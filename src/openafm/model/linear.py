"""The one linear seam: every projection in the model is this module.

Compression (lookup-table weights) and adapters (LoRA) attach here and nowhere else, so the
attention and MLP code never changes. It subclasses `nn.Linear` so PyTorch's tensor-parallel
styles (`ColwiseParallel`, `RowwiseParallel`) apply to it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """`y = x W^T` (no bias by default); the single place projections are computed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def use_decode_layout(self) -> None:
        """Store the weight in the memory order that makes one-token products fastest.

        Only the storage order changes (the values and `weight`'s shape do not). Measured with
        MKL on AVX-512 CPUs: matrix-vector products of wide outputs (out >= in) stream about
        1.5-2x faster from an input-major (column-major) weight, narrow ones from row-major.
        """
        w = self.weight.data
        if self.out_features >= self.in_features and w.is_contiguous():
            self.weight.data = w.t().contiguous().t()
