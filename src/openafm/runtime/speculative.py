"""Speculative decoding: draft a few tokens cheaply, verify them in one forward of the model.

Two drafters: prompt lookup (`PromptLookup`: the tokens that followed the latest earlier
occurrence of the sequence's last n-gram; summaries and rewrites copy much of their input) and
a draft model (`DraftModel`: a smaller or more compressed model sharing the tokenizer, with its
own KV cache, rolled back with the target's). Verification keeps the output exactly what plain
decoding gives: greedy keeps the drafted tokens while they are the model's own argmax; sampling
is speculative sampling (Leviathan et al., 2023): a drafted token d is kept with probability
min(1, p(d)/q(d)), else the token is drawn from max(0, p - q) normalized, so every token still
follows the model's distribution p (q: the drafter's distribution; all its mass on d for
prompt lookup).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from openafm.model import KVCache, Transformer
from openafm.runtime.sampling import SamplingParams, next_token_probs


@dataclass(frozen=True)
class Draft:
    """Drafted tokens and, per token, the drafter's distribution (None: all mass on it)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


@dataclass(frozen=True)
class PromptLookup:
    """Draft up to `max_draft` tokens by matching the last `max_ngram`..`min_ngram` tokens.

    The engine adapts the draft length within a generation (`next_draft_length`): two more
    after a fully accepted draft, one fewer after a rejection, so text that does not copy its
    input costs little.
    """

    max_draft: int = 3  # verifying 4 rows costs one pass of the kernels' 4-row chunks
    max_ngram: int = 3
    min_ngram: int = 2  # a single repeated token is weak evidence: drafts from it mostly fail

    def __post_init__(self) -> None:
        _check_max_draft(self.max_draft)
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")

    def session(self, max_len: int) -> PromptLookup:
        """The drafter for one generation (prompt lookup keeps no state)."""
        return self

    def draft(
        self,
        tokens: Sequence[int],
        limit: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        return Draft(self.propose(tokens, limit))

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


class DraftModel:
    """Draft up to `max_draft` tokens with `model`, which must share the target's tokenizer:
    a smaller or more compressed model of the same family (the palettized model drafting for
    the float one, say; a drafter of the target's architecture gets the request's feature
    adapter too). Greedy drafts are the drafter's argmax; sampled drafts are drawn from its
    distribution under the same sampling settings, which verification needs."""

    def __init__(self, model: Transformer, max_draft: int = 4) -> None:
        _check_max_draft(max_draft)
        self.model = model.eval()
        self.max_draft = max_draft

    def session(self, max_len: int) -> DraftModelSession:
        """The drafter for one generation of at most `max_len` tokens (its own KV cache)."""
        return DraftModelSession(self, max_len)


class DraftModelSession:
    """A draft model's cache for one generation: it holds the keys and values of `fed`, the
    longest prefix of the sequence it has seen that verification did not reject."""

    def __init__(self, drafter: DraftModel, max_len: int) -> None:
        self.drafter = drafter
        config = drafter.model.config
        self.cache = KVCache(config.n_layers, 1, min(max_len, config.max_seq_len))
        self.fed: list[int] = []

    def draft(
        self,
        tokens: Sequence[int],
        limit: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        """Up to `limit` tokens to follow `tokens` (the sequence so far)."""
        limit = min(limit, self.drafter.max_draft)
        keep = 0
        for a, b in zip(self.fed, tokens[:-1], strict=False):  # the last token is always fed
            if a != b:
                break
            keep += 1
        new = list(tokens[keep:])
        if limit < 1 or keep + len(new) + limit > self.cache.max_len:
            return Draft([])
        self.cache.truncate(keep)
        self.fed = self.fed[:keep]
        model, out, probs = self.drafter.model, [], []
        with torch.inference_mode():
            logits = model(torch.tensor([new]), self.cache, last_only=True)[0, -1]
            self.fed += new
            for i in range(limit):
                if params.temperature == 0.0:
                    token = int(logits.argmax())
                else:
                    q = next_token_probs(logits.unsqueeze(0), params)[0]
                    token = int(torch.multinomial(q, 1, generator=generator))
                    probs.append(q)
                out.append(token)
                if i + 1 < limit:
                    logits = model(torch.tensor([[token]]), self.cache, last_only=True)[0, -1]
                    self.fed.append(token)
        return Draft(out, torch.stack(probs) if probs else None)


Drafter = PromptLookup | DraftModel


def _check_max_draft(max_draft: int) -> None:
    if not 1 <= max_draft <= 15:  # verification stays within the kernels' 16 rows
        raise ValueError(f"max_draft must be in 1..15, not {max_draft}")


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
    draft_probs: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Check `draft` against the model's `logits` (len(draft) + 1, vocab) of one row.

    `logits[i]` predicts the token after the i-th fed token, the first fed token being the one
    before the draft; `draft_probs[i]` is the distribution the drafter drew token i from (None:
    all its mass on the token). Returns (drafted tokens accepted, the token that follows them).
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
        q = 1.0 if draft_probs is None else draft_probs[i, token].item()
        if u * q < probs[i, token].item():
            continue
        if draft_probs is None:
            residual = probs[i].clone()
            residual[token] = 0.0
        else:
            residual = (probs[i] - draft_probs[i]).clamp_(min=0.0)
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=generator))
