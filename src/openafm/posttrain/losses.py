"""The losses of the seed's post-training (arXiv 2407.21075, §5 and Appendix E).

- Reward model: a ranking loss with *soft* Bradley-Terry labels set by how strongly one
  response is preferred, plus cross-entropy of the grading heads.
- MDLOO: the whole response is one action; its reward is penalised by the KL to the reference
  policy; the advantage of each of K responses to a prompt is its reward minus the mean of the
  other K-1; the update is mirror-descent policy optimisation, E[ratio · A] minus (1/t) times
  the KL to the policy that sampled (the rollout policy), over several steps per batch.
- RLOO: the same advantage with PPO's clipped ratio in place of the KL trust region (TRL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# preference strength → probability that the chosen response is better (Appendix E)
STRENGTH_LABELS = {
    "significantly_better": 0.95,
    "better": 0.85,
    "slightly_better": 0.75,
    "negligibly_better": 0.65,
}


def soft_ranking_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, p: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Mean of -p·log sigmoid(r_c - r_r) - (1-p)·log sigmoid(r_r - r_c); p = 1 is plain
    Bradley-Terry."""
    margin = chosen - rejected
    p = torch.as_tensor(p, dtype=margin.dtype, device=margin.device)
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()


def grading_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the grading heads: `logits` (N, heads, levels), `labels` (N, heads),
    -1 where a response has no grade for that head (0 when nothing is graded)."""
    graded = labels >= 0
    if not bool(graded.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[graded], labels[graded])


def leave_one_out_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = R_i - mean of the other responses' rewards to the same prompt; `rewards` is
    (prompts, K) with K ≥ 2."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"a leave-one-out advantage needs K >= 2 responses per prompt, got {k}")
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def sequence_logprob(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """log π(y|x) of each response: the sum over its (masked) tokens; logits (B, T, V) predict
    tokens (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=-1)


def response_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The response positions of a (B, T) mask as a boolean index and, for each of them in
    row-major order, the response (row) it belongs to."""
    keep = mask.bool()
    return keep, keep.nonzero()[:, 0]


def per_response(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Sum per-position `values` into the `n` responses that `rows` names."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def response_logprob(
    logp: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, n: int
) -> torch.Tensor:
    """log π(y|x) of each of `n` responses from (N, V) log-probabilities at their N positions."""
    return per_response(logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), rows, n)


def kl_penalized_reward(
    reward: torch.Tensor, policy_logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float
) -> torch.Tensor:
    """R(x, y) = r(x, y) - β · log(π_θ(y|x) / π_ref(y|x)), per response."""
    return reward - beta * (policy_logprob - reference_logprob)


def token_kl(
    logp: torch.Tensor, old_logp: torch.Tensor, rows: torch.Tensor, n: int
) -> torch.Tensor:
    """Exact KL(π_θ ‖ π_old) summed over each response's tokens: `logp` and `old_logp` are
    (N, V) log-probabilities over the full vocabulary at the N response positions."""
    return per_response((logp.exp() * (logp - old_logp)).sum(dim=-1), rows, n)


def mdpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    advantages: torch.Tensor,
    step_size: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Minus the MDPO objective E[ratio · A] - (1/t) · KL(π_θ ‖ π_old), with the whole response
    as one action (ratio of sequence probabilities). `logp`/`old_logp` (N, V) are the policy's
    and the rollout policy's log-probabilities at the N response positions, `tokens` (N,) the
    sampled tokens, `rows` (N,) the response of each position, `advantages` one per response."""
    n = advantages.shape[0]
    index = tokens.unsqueeze(-1)
    picked = (logp.gather(-1, index) - old_logp.gather(-1, index)).squeeze(-1)
    ratio = torch.exp(per_response(picked, rows, n))
    kl = token_kl(logp, old_logp, rows, n)
    loss = -(ratio * advantages).mean() + kl.mean() / step_size
    return loss, {
        "kl_to_old": float(kl.detach().mean()),
        "ratio_mean": float(ratio.detach().mean()),
    }


def rloo_clipped_loss(
    logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """PPO's clipped surrogate on whole-response ratios with leave-one-out advantages."""
    ratio = torch.exp(logprob - old_logprob)
    clipped = ratio.clamp(1 - clip, 1 + clip)
    return -torch.minimum(ratio * advantages, clipped * advantages).mean()
