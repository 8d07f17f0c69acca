"""The reward model with a LoRA backbone on a tiny model: it learns a preference end to end, a
run stopped part-way resumes to the uninterrupted result (a rerun with other settings is
refused), it saves and loads with its adapter, and the CLI trains and scores it."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from openafm.adapters import LoraConfig
from openafm.adapters.trainer import ResumeError
from openafm.cli.main import app
from openafm.posttrain.preferences import PreferencePair
from openafm.posttrain.reward_lora import train_lora_reward_model
from openafm.posttrain.reward_training import (
    RewardTrainConfig,
    load_reward_model,
    save_reward_model,
    score_answers,
)
from tests.conftest import byte_tokenizer, make_tiny

WORDS = ["river", "stone", "cloud", "field", "light", "bread", "glass", "track"]


def _pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """The chosen answer opens with 'good', the rejected one with 'bad'; the rest is shared."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        rest = " ".join(rng.choice(WORDS) for _ in range(4))
        pairs.append(PreferencePair((("user", "say"),), f"good {rest}", f"bad {rest}"))
    return pairs


CONFIG = RewardTrainConfig(steps=40, batch_size=8, lr=5e-3, max_tokens=64)
LORA = LoraConfig(rank=4, alpha=8.0)


def _train(tmp_path, config=CONFIG, **kwargs):
    model, tokenizer = make_tiny(), byte_tokenizer()
    with torch.no_grad():  # a random tiny model's states are too alike to separate quickly
        model.embed.weight.mul_(25)
    return train_lora_reward_model(
        model, tokenizer, _pairs(48), config, tmp_path, lora=LORA, holdout=16, **kwargs
    )


def test_the_lora_reward_model_learns_a_preference_and_generalises(tmp_path):
    _, adapter, report = _train(tmp_path / "run")
    assert report["holdout_accuracy"] >= 0.9
    assert all(float(b.abs().max()) > 0 for _, b in adapter.pairs.values())  # B started at 0


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path):
    _, whole, whole_report = _train(tmp_path / "whole")

    def stop(step: int, loss: float) -> None:
        if step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "stopped", on_step=stop)
    _, resumed, report = _train(tmp_path / "stopped")
    assert report["resumed_from"] == 20
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert report["holdout_accuracy"] == whole_report["holdout_accuracy"]
    with pytest.raises(ResumeError, match="other settings"):
        _train(tmp_path / "stopped", dataclasses.replace(CONFIG, lr=1e-3))


def test_a_saved_lora_reward_model_scores_as_it_did_when_trained(tmp_path):
    reward_model, adapter, _ = _train(tmp_path / "run", RewardTrainConfig(steps=5, batch_size=4))
    tokenizer = byte_tokenizer()
    prompts, answers = [(("user", "say"),)] * 2, ["good river stone", "bad river stone"]
    before, _ = score_answers(reward_model, tokenizer, prompts, answers)
    meta = {"base_signature": "abc", "tokenizer": tokenizer.fingerprint(), "max_tokens": 64}
    save_reward_model(reward_model, tmp_path / "rm", meta, adapter)
    assert (tmp_path / "rm" / "adapter" / "adapter.json").is_file()
    assert "base_signature" not in adapter.metadata  # signed on disk, the caller's left alone
    fresh = make_tiny()
    with torch.no_grad():
        fresh.embed.weight.mul_(25)
    loaded = load_reward_model(tmp_path / "rm", fresh, "abc", tokenizer)
    assert loaded.max_tokens == 64  # scoring keeps the window it was trained on
    after, _ = score_answers(loaded, tokenizer, prompts, answers)
    assert after == pytest.approx(before, abs=2e-2)
    plain, _ = score_answers(
        load_reward_model(tmp_path / "rm", make_tiny(), "abc", tokenizer),
        tokenizer,
        prompts,
        answers,
    )
    assert plain != pytest.approx(before, abs=2e-2)  # the embeddings differ: a real check


def test_rm_train_with_lora_and_rm_score_end_to_end(tmp_path, tiny_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "say", "chosen": p.chosen, "rejected": p.rejected}) + "\n"
            for p in _pairs(12)
        )
    )
    runner = CliRunner()
    common = ["--data", str(data), "--model", str(tiny_dir)]
    refused = runner.invoke(
        app,
        ["posttrain", "rm", "train", *common, "--out", str(tmp_path / "x"), "--lora-rank", "4",
         "--cv", "3"],
    )  # fmt: skip
    assert refused.exit_code != 0 and "--holdout" in refused.output
    assert not (tmp_path / "x").exists()
    trained = runner.invoke(
        app,
        ["posttrain", "rm", "train", *common, "--out", str(tmp_path / "rm"), "--lora-rank", "4",
         "--holdout", "4", "--steps", "3", "--batch-size", "4",
         "--run-dir", str(tmp_path / "run"), "--json"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.output.strip().splitlines()[-1])
    assert report["backbone"] == "LoRA rank 4" and report["holdout_pairs"] == 4
    scored = runner.invoke(
        app,
        ["posttrain", "rm", "score", "--reward-model", str(tmp_path / "rm"), *common, "--json"],
    )
    assert scored.exit_code == 0, scored.output
