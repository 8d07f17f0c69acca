"""Sampling: greedy, top-k, top-p and seeds, checked as properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openafm.runtime import SamplingParams, sample_next


def _logits(seed: int, vocab: int = 50) -> torch.Tensor:
    return torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@given(seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_greedy_is_argmax(seed):
    logits = _logits(seed)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


@given(seed=st.integers(0, 10_000), k=st.integers(1, 10))
@settings(max_examples=30, deadline=None)
def test_top_k_only_samples_the_k_likeliest(seed, k):
    logits = _logits(seed)
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.topk(logits, k, dim=-1).indices
    for _ in range(20):
        picks = sample_next(logits, SamplingParams(temperature=1.5, top_k=k), gen)
        assert all(picks[i] in allowed[i] for i in range(len(picks)))


@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 0.95))
@settings(max_examples=30, deadline=None)
def test_top_p_only_samples_the_nucleus(seed, p):
    logits = _logits(seed)
    probs = logits.softmax(-1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        picks = sample_next(logits, SamplingParams(temperature=1.0, top_p=p), gen)
        for row, tok in enumerate(picks.tolist()):
            # Every token strictly more likely than the pick is needed to reach p before it.
            above = probs[row][probs[row] > probs[row, tok]].sum()
            assert above < p + 1e-6


def test_same_seed_same_samples_and_distribution_follows_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample_next(logits, params, torch.Generator().manual_seed(7)).item() for _ in range(3)]
    b = [sample_next(logits, params, torch.Generator().manual_seed(7)).item() for _ in range(3)]
    assert a == b
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [sample_next(logits.expand(1000, 4), params, gen) for _ in range(4)]
    ).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": ("",)},
    ],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
