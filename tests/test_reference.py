"""The default base against an independent implementation (transformers, float32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from openafm.runtime import Engine, SamplingParams

pytestmark = pytest.mark.slow


def test_tokenize_matches_reference(smollm2, reference):
    for case in reference["tokenize"]:
        assert smollm2.tokenizer.encode(case["text"]) == case["ids"], case["text"]
        assert smollm2.tokenizer.decode(case["ids"], skip_special_tokens=False) == case["text"]


def test_chat_prompt_rendered_like_reference(smollm2, reference):
    for case in reference["greedy_chat"]:
        assert smollm2.tokenizer.render_chat(case["messages"]) == case["rendered_prompt"]
        assert smollm2.tokenizer.encode_chat(case["messages"]) == case["prompt_ids"]


def test_logits_match_reference(smollm2, reference):
    for case in reference["logits"]:
        with torch.inference_mode():
            logits = smollm2.model(torch.tensor([case["ids"]]))[0]
        last = logits[-1]
        top = torch.tensor(case["last_top20_ids"])
        assert torch.topk(last, 20).indices.tolist() == case["last_top20_ids"]
        torch.testing.assert_close(
            last[top], torch.tensor(case["last_top20_logits"]), atol=1e-3, rtol=0
        )
        assert logits.argmax(-1).tolist() == case["per_position_argmax"]
        torch.testing.assert_close(
            logits.max(-1).values, torch.tensor(case["per_position_max_logit"]), atol=1e-3, rtol=0
        )
        assert abs(torch.logsumexp(last, 0).item() - case["last_logsumexp"]) < 1e-3


def test_greedy_chat_matches_reference_one_by_one_and_batched(smollm2, reference):
    engine = Engine(smollm2.model, smollm2.tokenizer)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    cases = reference["greedy_chat"]
    for case in cases:
        (done,) = engine.generate([case["prompt_ids"]], params)
        assert done.token_ids == case["greedy_ids"]
        assert done.prompt_tokens == len(case["prompt_ids"])
    batched = engine.generate([c["prompt_ids"] for c in cases], params)
    assert [d.token_ids for d in batched] == [c["greedy_ids"] for c in cases]
    # An answer that ended with <|im_end|> stopped on it; the text leaves it out.
    first = batched[0]
    assert first.finish_reason == "stop" and first.text == "The capital of France is Paris."
    assert batched[1].finish_reason == "length" and batched[1].completion_tokens == 48


def _afm(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openafm", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        check=False,
        timeout=600,
    )


def test_greedy_chat_through_the_cli(reference):
    for case in reference["greedy_chat"]:
        system = [m["content"] for m in case["messages"] if m["role"] == "system"]
        user = next(m["content"] for m in case["messages"] if m["role"] == "user")
        args = ["generate", "--json", "--temperature", "0", "--max-tokens", "48", user]
        if system:
            args += ["--system", system[0]]
        proc = _afm(*args)
        assert proc.returncode == 0, proc.stderr.decode()
        out = json.loads(proc.stdout)
        assert out["token_ids"] == case["greedy_ids"]
        assert out["prompt_tokens"] == len(case["prompt_ids"])
        assert out["completion_tokens"] == len(case["greedy_ids"])
        assert out["finish_reason"] in ("stop", "length")
        assert out["ttft_ms"] > 0 and out["decode_tokens_per_s"] > 0


def test_cli_streams_the_same_text_as_json(reference):
    case = reference["greedy_chat"][2]
    user = case["messages"][0]["content"]
    plain = _afm("generate", "--max-tokens", "48", user)
    assert plain.returncode == 0, plain.stderr.decode()
    expected = case["greedy_text"].removesuffix("<|im_end|>")
    assert plain.stdout.decode() == expected + "\n"
