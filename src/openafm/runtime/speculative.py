"""Speculative decoding: draft a few tokens cheaply, verify them in one forward of the model.

The draft here is prompt lookup: the tokens that followed the latest earlier occurrence of the
sequence's last n-gram (summaries and rewrites copy much of their input). Verification keeps
the output exactly what plain decoding gives: greedy keeps the drafted tokens while they are the
model's own argmax; sampling accepts a drafted token d with probability p(d) and otherwise draws
from p with d removed, which is speculative sampling (Leviathan et al., 2023) for a draft that
puts all its mass on d, so every token still follows the model's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from openafm.runtime.sampling import SamplingParams, next_token_probs


@dataclass(frozen=True)
class PromptLookup:
    """Draft up to `max_draft` tokens by matching the last `max_ngram`..`min_ngram` tokens.

    The engine adapts the draft length within a generation (`next_draft_length`): two more
    after a fully accepted draft, one fewer after a rejection, so text that does not copy its
    input costs little.
    """

    max_draft: int = 8
    max_ngram: int = 3
    min_ngram: int = 2  # a single repeated token is weak evidence: drafts from it mostly fail

    def __post_init__(self) -> None:
        if not 1 <= self.max_draft <= 15:  # verification stays within the kernels' 16 rows
            raise ValueError(f"max_draft must be in 1..15, not {self.max_draft}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")

    def propose(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Draft tokens to follow `tokens` (at most `limit`), or none."""
        limit = min(limit, self.max_draft)
        if limit < 1:
            return []
        seq = list(tokens)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            # the latest earlier occurrence whose continuation is not the tail itself
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    return seq[start + n : start + n + limit]
        return []


def next_draft_length(current: int, drafted: int, accepted: int, most: int) -> int:
    """The next draft's length after `accepted` of `drafted` tokens were kept."""
    if drafted == 0:
        return current
    return min(most, current + 2) if accepted == drafted else max(1, current - 1)


def verify(
    logits: torch.Tensor,
    draft: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Check `draft` against the model's `logits` (len(draft) + 1, vocab) of one row.

    `logits[i]` predicts the token after the i-th fed token, the first fed token being the one
    before the draft. Returns (drafted tokens accepted, the token that follows them).
    """
    if params.temperature == 0.0:
        best = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == best[accepted]:
            accepted += 1
        return accepted, best[accepted]
    probs = next_token_probs(logits, params)
    for i, token in enumerate(draft):
        u = torch.rand((), generator=generator).item()
        if u < probs[i, token].item():
            continue
        residual = probs[i].clone()
        residual[token] = 0.0
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=generator))
