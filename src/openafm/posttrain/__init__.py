"""Post-training: the reward model's losses, leave-one-out advantages and the MDLOO / RLOO
policy objectives (SFT, rejection sampling with a committee and the RL loop build on these)."""

from openafm.posttrain.losses import (
    STRENGTH_LABELS,
    grading_loss,
    kl_penalized_reward,
    leave_one_out_advantage,
    mdpo_loss,
    rloo_clipped_loss,
    sequence_logprob,
    soft_ranking_loss,
)

__all__ = [
    "STRENGTH_LABELS",
    "grading_loss",
    "kl_penalized_reward",
    "leave_one_out_advantage",
    "mdpo_loss",
    "rloo_clipped_loss",
    "sequence_logprob",
    "soft_ranking_loss",
]
