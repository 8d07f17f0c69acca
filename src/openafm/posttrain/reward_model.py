"""The seed's reward model: the base model's final hidden state at a response's last token feeds
a linear reward head and four small MLP grading heads (instruction following, verbosity,
truthfulness, harmlessness; three levels each). Trained with the soft-label ranking loss plus
λ times the grading heads' cross-entropy on both responses of a pair."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from openafm.model import Transformer
from openafm.posttrain.losses import grading_loss, soft_ranking_loss

GRADES = ("instruction_following", "verbosity", "truthfulness", "harmlessness")
LEVELS = 3


class RewardModel(nn.Module):
    """A backbone (LoRA on it, or trained in full) and the reward and grading heads."""

    def __init__(
        self, backbone: Transformer, grade_hidden: int = 256, max_tokens: int = 512
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.max_tokens = max_tokens  # the window it was trained on: scoring keeps the same
        dim = backbone.config.dim
        self.reward_head = nn.Linear(dim, 1)
        self.grade_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, grade_hidden), nn.SiLU(), nn.Linear(grade_hidden, LEVELS))
            for _ in GRADES
        )

    def forward(
        self, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (B,) and grade logits (B, 4, 3) of right-padded sequences of `lengths`."""
        if int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1]:
            raise ValueError("every sequence needs between 1 and the padded width of tokens")
        hidden = self.backbone.hidden_states(tokens)
        last = hidden[torch.arange(tokens.shape[0]), lengths - 1].float()
        with torch.autocast(tokens.device.type, enabled=False):  # the heads stay float32
            return self.heads(last)

    def heads(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (B,) and grade logits (B, 4, 3) from last-token hidden states (B, dim)."""
        grades = torch.stack([head(last) for head in self.grade_heads], dim=1)
        return self.reward_head(last).squeeze(-1), grades


@dataclass(frozen=True)
class PairBatch:
    """Chosen and rejected responses (prompt included, right-padded), preference strength p,
    and per-response grades (N, 4) with -1 where a grade is unknown."""

    chosen: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected: torch.Tensor
    rejected_lengths: torch.Tensor
    p: torch.Tensor
    chosen_grades: torch.Tensor
    rejected_grades: torch.Tensor


def reward_model_loss(
    model: RewardModel, batch: PairBatch, grade_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft-label ranking loss + grade_weight * grading cross-entropy on both responses."""
    r_chosen, g_chosen = model(batch.chosen, batch.chosen_lengths)
    r_rejected, g_rejected = model(batch.rejected, batch.rejected_lengths)
    ranking = soft_ranking_loss(r_chosen, r_rejected, batch.p)
    grading = grading_loss(
        torch.cat([g_chosen, g_rejected]), torch.cat([batch.chosen_grades, batch.rejected_grades])
    )
    accuracy = float((r_chosen > r_rejected).float().mean())
    loss = ranking + grade_weight * grading
    stats = {"ranking": float(ranking.detach()), "grading": float(grading.detach())}
    return loss, {**stats, "accuracy": accuracy}
