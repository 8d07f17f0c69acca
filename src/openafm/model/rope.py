"""Rotary position embedding (the "rotate half" layout used by Hugging Face llama)."""

from __future__ import annotations

import torch
from torch import nn

from openafm import kernels
from openafm.kernels import reference


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; `forward(positions)` gathers rows for the given positions."""

    def __init__(self, head_dim: int, theta: float, max_seq_len: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset(torch.device("cpu"))

    def reset(self, device: torch.device) -> None:
        """(Re)compute the tables on `device` (after the model was built on the meta device)."""
        if device.type == "meta":
            device = torch.device("cpu")
        inv_freq = 1.0 / (
            self.theta
            ** (
                torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device)
                / self.head_dim
            )
        )
        t = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().float()
        self.sin = emb.sin().float()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin shaped to broadcast against (batch, heads, seq, head_dim)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:  # per-row positions (batch, seq)
            return cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and kernels.native()
    ):
        return kernels.rope(x, cos, sin)  # one call, the same values to the bit
    return reference.rope(x, cos, sin).to(x.dtype)  # differentiable; traces for export
