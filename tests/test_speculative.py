"""Speculative decoding gives exactly plain decoding's output; the thread tuner picks the faster."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from openafm.runtime import DraftModel, Engine, PromptLookup, SamplingParams, threads
from openafm.runtime.speculative import next_draft_length, verify
from openafm.runtime.threads import IdleCores, ThreadTuner
from tests.conftest import FIXTURES, byte_tokenizer, make_tiny


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lookup = PromptLookup(max_draft=4, max_ngram=3, min_ngram=2)
    seq = [1, 2, 3, 9, 9, 5, 1, 2, 3, 7, 8, 6, 1, 2, 3]
    assert lookup.propose(seq, 10) == [7, 8, 6, 1]  # the later of the two [1, 2, 3]
    assert lookup.propose(seq, 2) == [7, 8]
    assert lookup.propose([4, 5, 6], 4) == []
    assert PromptLookup(min_ngram=1).propose([5, 6, 0, 5], 4) == [6, 0, 5]  # a 1-gram match
    assert lookup.propose([5, 6, 0, 5], 4) == []  # by default two tokens must match
    with pytest.raises(ValueError, match="max_draft"):
        PromptLookup(max_draft=16)


def test_draft_length_grows_on_success_and_shrinks_on_rejection():
    assert next_draft_length(4, 4, 4, most=8) == 6
    assert next_draft_length(7, 7, 7, most=8) == 8
    assert next_draft_length(4, 4, 1, most=8) == 3
    assert next_draft_length(1, 1, 0, most=8) == 1
    assert next_draft_length(5, 0, 0, most=8) == 5


def test_sampled_verification_keeps_the_model_distribution():
    """The first token out of `verify` follows p, whether the draft is likely or not."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    p = logits[0].softmax(-1)
    gen = torch.Generator().manual_seed(0)
    for drafted in (0, 3):  # the likeliest token, then an unlikely one
        counts = torch.zeros(5)
        for _ in range(20000):
            accepted, token = verify(logits, [drafted], params, gen)
            counts[drafted if accepted else token] += 1
        assert (counts / counts.sum() - p).abs().max() < 0.015


def test_verification_of_a_draft_model_keeps_the_model_distribution():
    """Tokens drawn from a drafter's q, then verified, follow the model's p (not q)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    params = SamplingParams(temperature=1.0)
    p = logits[0].softmax(-1)
    q = torch.tensor([[0.05, 0.1, 0.15, 0.6, 0.1]])  # far from p
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(20000):
        drafted = int(torch.multinomial(q[0], 1, generator=gen))
        accepted, token = verify(logits, [drafted], params, gen, draft_probs=q)
        counts[drafted if accepted else token] += 1
    assert (counts / counts.sum() - p).abs().max() < 0.015


def test_a_draft_model_changes_no_greedy_token_and_the_model_itself_is_always_accepted(tiny):
    tokenizer = byte_tokenizer()
    plain = Engine(tiny, tokenizer, tune_threads=False)
    for drafter, seed in ((make_tiny(seed=5), 5), (tiny, 0)):
        fast = Engine(tiny, tokenizer, speculation=DraftModel(drafter, 4), tune_threads=False)
        for text in ("abcabcabcabc", "the cat sat on the mat"):
            ids = fast.encode(text, chat=False)
            params = SamplingParams(max_tokens=30, ignore_eos=True)
            want = plain.generate([ids], params)[0]
            got = fast.generate([ids], params)[0]
            assert got.token_ids == want.token_ids
            assert got.draft_tokens > 0
            if seed == 0:  # drafting with the model itself: every draft is its own argmax
                assert got.accepted_tokens == got.draft_tokens
        sampled = SamplingParams(max_tokens=20, temperature=0.9, seed=1)
        ids = fast.encode("abcabc", chat=False)
        assert (
            fast.generate([ids], sampled)[0].token_ids == fast.generate([ids], sampled)[0].token_ids
        )


def test_a_draft_model_with_another_vocabulary_is_refused(tiny):
    from dataclasses import replace

    from openafm.model import Transformer

    other = Transformer(replace(tiny.config, vocab_size=300))
    with pytest.raises(ValueError, match="share the tokenizer"):
        Engine(tiny, byte_tokenizer(), speculation=DraftModel(other))


def _engines(model, tokenizer, **lookup):
    plain = Engine(model, tokenizer, tune_threads=False)
    fast = Engine(model, tokenizer, speculation=PromptLookup(**lookup), tune_threads=False)
    return plain, fast


def test_greedy_speculation_is_token_for_token_plain_decoding(tiny):
    tokenizer = byte_tokenizer()
    plain, fast = _engines(tiny, tokenizer, max_draft=6)
    drafted = accepted = 0
    for text in ("abcabcabcabc", "the cat sat on the mat, the cat", "xyz", "aaaa bbbb aaaa"):
        ids = fast.encode(text, chat=False)
        for params in (
            SamplingParams(max_tokens=40),
            SamplingParams(max_tokens=7, stop=("a",)),
            SamplingParams(max_tokens=25, ignore_eos=True),
        ):
            want = plain.generate([ids], params)[0]
            got = fast.generate([ids], params)[0]
            assert got.token_ids == want.token_ids
            assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
            assert "".join(fast.stream(ids, params)) == want.text
            drafted, accepted = drafted + got.draft_tokens, accepted + got.accepted_tokens
    assert drafted > 0 and 0 < accepted <= drafted


def test_seeded_speculative_sampling_is_reproducible(tiny):
    _, fast = _engines(tiny, byte_tokenizer())
    ids = fast.encode("abcabcabc", chat=False)
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=3)
    assert fast.generate([ids], params)[0].token_ids == fast.generate([ids], params)[0].token_ids


@pytest.mark.slow
def test_speculation_on_the_summarization_features_changes_no_token():
    from openafm.cli.common import load_named
    from openafm.features import get_feature
    from openafm.runtime import engine_for

    drafted = accepted = 0
    # the shipped adapters on the float base; the palettized model (with its recovery adapter)
    for model, use_adapter in (("smollm2-135m-instruct", True), ("smollm2-135m-palettized", False)):
        pretrained = load_named(model)
        plain = engine_for(pretrained)
        fast = engine_for(pretrained, speculation=PromptLookup())
        for name, path in (
            ("summarize-email", "aeslc_test_head4.jsonl"),
            ("summarize-dialogue", "dialogsum_test_head3.jsonl"),
        ):
            task = get_feature(name)
            adapter = task.adapter if use_adapter else None
            lines = (FIXTURES / "summaries" / path).read_text().splitlines()
            for record in map(json.loads, lines[:2]):
                ids = plain.tokenizer.encode_chat(task.messages(record))
                params = SamplingParams(max_tokens=task.max_tokens)
                want = plain.generate([ids], params, adapters=adapter)[0]
                got = fast.generate([ids], params, adapters=adapter)[0]
                assert got.token_ids == want.token_ids, (model, name)
                drafted, accepted = drafted + got.draft_tokens, accepted + got.accepted_tokens
    assert accepted > 0


class FakeIdle(IdleCores):
    """Idle cores as the test sets them (None: unknown), with no waiting for the counters."""

    def __init__(self, cores: float | None) -> None:
        self.cores = cores

    def restart(self) -> None:
        pass

    def span(self) -> float:
        return float("inf")

    def __call__(self) -> float | None:
        return self.cores


def _run_tuner(tuner: ThreadTuner, steps: int, slow_threads: int) -> list[int]:
    """Thread counts of `steps` sleeps, 4 ms with `slow_threads` threads and 1 ms otherwise."""
    used = []
    for _ in range(steps):
        with tuner.step():
            used.append(torch.get_num_threads())
            time.sleep(0.004 if used[-1] == slow_threads else 0.001)
    return used


def test_thread_tuner_uses_the_faster_count_and_follows_a_change():
    tuner = ThreadTuner(candidates=(1, 2), idle_cores=FakeIdle(None))  # room unknown: probe
    before = torch.get_num_threads()
    used = _run_tuner(tuner, 30, slow_threads=2)
    assert torch.get_num_threads() == before  # restored after every step
    assert used[:12] == [1] * 8 + [2, 2, 1, 1]  # the fewest first, then a probe of the rest
    assert tuner.best == 1 and used[-10:] == [1] * 10
    used = _run_tuner(tuner, 30, slow_threads=1)  # the machine changes: one thread is slow
    assert tuner.best == 2 and used[-10:] == [2] * 10  # seen within eight steps, then probed


def test_a_re_probe_times_one_step_of_the_other_count_against_the_recent_steps():
    tuner = ThreadTuner(candidates=(1, 2), idle_cores=FakeIdle(None))
    used = _run_tuner(tuner, 8 + 2 + 32 + 8, slow_threads=1)
    assert used[:10] == [1] * 8 + [2, 2]  # the first probe: two steps of two threads
    assert used[10:42] == [2] * 32 and used[42] == 1 and used[43:] == [2] * 7
    assert tuner.interval == 64  # the same winner: the next probe waits twice as long


def test_no_probe_of_more_threads_while_the_machine_has_no_idle_core():
    idle = FakeIdle(0.05)  # what a CPU-bound neighbour leaves idle on a 2-core machine
    tuner = ThreadTuner(candidates=(1, 2), idle_cores=idle)
    used = _run_tuner(tuner, 8 + 3 * 32, slow_threads=1)  # two threads would be faster...
    assert used == [1] * len(used) and tuner.probes == 0  # ...but there is no core to run on
    idle.cores = 0.9  # the neighbour stops: more threads are tried within one interval
    used = _run_tuner(tuner, 40, slow_threads=1)
    assert tuner.best == 2 and used[-5:] == [2] * 5


class ClockedIdle(FakeIdle):
    """Idle cores as the test sets them; the reading's span is real time since `restart()`."""

    def __init__(self, cores: float) -> None:
        super().__init__(cores)
        self.restart()

    def restart(self) -> None:
        self.started = time.monotonic()

    def span(self) -> float:
        return time.monotonic() - self.started


def test_steps_longer_than_a_reading_still_probe(monkeypatch):
    # an RL update's micro-step takes 1-2 s, longer than the freshest reading the tuner uses
    # (1 s): read over the last step, not restarted after it, or the probe never comes
    monkeypatch.setattr(threads, "MIN_SPAN", 0.01)
    monkeypatch.setattr(threads, "MAX_SPAN", 0.02)
    tuner = ThreadTuner(candidates=(1, 2), idle_cores=ClockedIdle(0.9))
    used = []
    for _ in range(14):
        with tuner.step():
            used.append(torch.get_num_threads())
            time.sleep(0.06 if used[-1] == 1 else 0.03)
    assert tuner.probes == 1 and used[8:10] == [2, 2] and used[-3:] == [2] * 3


def test_idle_cores_are_read_from_the_kernel_counters(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 20 0 0 0 0 0\ncpu0 50 0 25 500 10 0 0 0 0 0\n")
    idle = IdleCores(stat)
    time.sleep(0.1)
    ticks = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  100 0 50 {1000 + ticks // 10} 20 0 0 0 0 0\n")
    assert idle.span() >= 0.1
    assert idle() == pytest.approx(1.0, rel=0.35)  # a tenth of a second idle in 0.1 s
    idle.restart()
    assert idle.span() < 0.1
    missing = IdleCores(tmp_path / "missing")
    assert missing() is None and missing.span() == float("inf")  # no counters: never wait


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's CPU counters")
def test_idle_cores_see_a_busy_process_and_the_tuner_waits_for_a_long_enough_reading():
    import subprocess
    import sys

    idle = IdleCores()
    time.sleep(0.3)
    quiet = idle()
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count())
    ]
    try:
        time.sleep(0.2)
        idle.restart()
        time.sleep(0.3)
        busy = idle()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert quiet is not None and busy is not None
    assert busy < 0.5 <= quiet  # every core taken; this test itself sleeps
    tuner = ThreadTuner(candidates=(1, 2))  # real counters: the first probe needs 0.1 s of them
    used = _run_tuner(tuner, 12, slow_threads=2)
    assert used == [1] * 12  # 12 one-millisecond steps are too short a reading to probe on


def test_one_thread_means_no_tuning():
    tuner = ThreadTuner(candidates=(1,))
    assert not tuner.active
    with tuner.step():
        pass
