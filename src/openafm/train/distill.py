"""Distillation losses for pre-training a student from a teacher (the seed's on-device recipe).

The seed's target at each position is 0.9 · the teacher's top-1 token + 0.1 · the true next
token (one token carrying both weights when they agree); the student minimises the cross-entropy
to that target. `kl` is the alternative: KL divergence from the teacher's whole distribution.
Positions labelled `IGNORE` are left out; losses are means over the positions kept.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100  # cross_entropy's ignore_index, as in the SFT data
DistillMode = Literal["top1", "kl"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: DistillMode = "top1",
    teacher_weight: float = 0.9,
) -> torch.Tensor:
    """Mean distillation loss over the positions whose label is not `IGNORE`."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits"
            f" {tuple(teacher_logits.shape)} differ: do the models share a tokenizer?"
        )
    if not 0.0 <= teacher_weight <= 1.0:
        raise ValueError(f"teacher_weight must lie in [0, 1], got {teacher_weight}")
    keep = labels != IGNORE
    logp = F.log_softmax(student_logits[keep].float(), dim=-1)
    teacher = teacher_logits[keep].float()
    if mode == "kl":
        target = F.log_softmax(teacher, dim=-1)
        return F.kl_div(logp, target, log_target=True, reduction="batchmean")
    if mode != "top1":
        raise ValueError(f"unknown distillation mode {mode!r}: use top1 or kl")
    top1 = teacher.argmax(dim=-1, keepdim=True)
    on_teacher = logp.gather(-1, top1).squeeze(-1)
    on_label = logp.gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    return -(teacher_weight * on_teacher + (1 - teacher_weight) * on_label).mean()
