"""RMSNorm, computed by one native call in inference (six small PyTorch operations otherwise).

The native sum runs in another order than PyTorch's, so results differ in the last bits; it is
used under `torch.inference_mode` only (the engine's decode), never where a test or a trainer
compares against PyTorch's own values (`no_grad` included).
"""

from __future__ import annotations

import torch
from torch import nn

from openafm import kernels


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters, same plans), with a native inference path on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native_ok(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps or torch.finfo(x.dtype).eps)
        return super().forward(x)


def _native_ok(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return (
        weight is not None
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and type(weight) in (torch.Tensor, nn.Parameter)
        and torch.is_inference_mode_enabled()
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
        and kernels.native()
    )
