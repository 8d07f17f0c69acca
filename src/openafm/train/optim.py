"""The seed's optimizer: RMSProp with momentum, bias correction and per-block update clipping.

For each parameter (a "block") at step t:

    v = β₂·v + (1-β₂)·g²                  (EMA of squared gradients)
    u = g / (√(v / (1-β₂ᵗ)) + ε)           (bias-corrected RMS normalisation)
    u = u / max(1, rms(u) / clip)          (the block's update clipped to RMS `clip`)
    m = β₁·m + (1-β₁)·u                    (momentum on the normalised update)
    p = p - lr·(m + wd·p)                  (decoupled weight decay)

On sharded (DTensor) parameters `rms(u)` is a DTensor reduction over every shard, so the clip
is the same as on the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RMSPropMomentum(torch.optim.Optimizer):
    """RMSProp with momentum as the seed describes it (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        clip: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not clip > 0:
            raise ValueError(f"clip must be positive, got {clip}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "clip": clip,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["square_avg"] = torch.zeros_like(p)
                    state["momentum"] = torch.zeros_like(p)
                state["step"] += 1
                g = p.grad
                square_avg, momentum = state["square_avg"], state["momentum"]
                square_avg.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (square_avg / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
                update = g / denom
                rms = update.pow(2).mean().sqrt()
                update.div_(torch.clamp(rms / group["clip"], min=1.0))
                momentum.mul_(beta1).add_(update, alpha=1 - beta1)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(momentum, alpha=-group["lr"])
        return loss
