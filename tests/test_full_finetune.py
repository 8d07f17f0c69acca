"""Full fine-tuning (`afm posttrain sft --full`) on the tiny model: every weight learns, a run
stopped part-way resumes to the uninterrupted weights, the saved directory loads as a model and
generates, and what cannot be fine-tuned in full is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from openafm.adapters.sft_data import read_conversations, tokenize_conversation
from openafm.adapters.trainer import ResumeError, TrainConfig, train_full
from openafm.runtime import load_pretrained
from tests.conftest import byte_tokenizer, make_tiny
from tests.test_adapter_training import chat_file
from tests.test_cli import afm, assert_one_line_error
from tests.test_compress import _compressed_tiny

CONFIG = TrainConfig(steps=6, lr=3e-3, batch_size=4, warmup_steps=1, checkpoint_every=2, bf16=False)


def _examples(tmp_path):
    tok = byte_tokenizer()
    conversations = read_conversations(chat_file(tmp_path / "d.jsonl"))
    return [tokenize_conversation(tok, c) for c in conversations], tok.eos_id


def _train(model, tmp_path, run_dir, config=CONFIG, **kwargs):
    examples, pad = _examples(tmp_path)
    return train_full(model, examples, run_dir, config, pad_id=pad, data_checksum="d", **kwargs)


def test_every_weight_learns_and_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    whole = make_tiny()
    before = {k: v.clone() for k, v in whole.state_dict().items()}
    losses: list[float] = []
    _train(whole, tmp_path, tmp_path / "whole", on_step=lambda r: losses.append(r.loss))
    assert losses[-1] < losses[0]
    for name, tensor in whole.state_dict().items():
        if name != "embed.weight":  # rows of bytes the data never uses get no gradient
            assert not torch.equal(tensor, before[name]), name
    assert whole.output.weight is whole.embed.weight  # still tied

    def stop(report) -> None:
        if report.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(make_tiny(), tmp_path, tmp_path / "stopped", on_step=stop)
    resumed = make_tiny()
    result = _train(resumed, tmp_path, tmp_path / "stopped")
    assert result.resumed_from == 2
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, whole.state_dict()[name], msg=name)
    with pytest.raises(ResumeError, match="other settings"):
        _train(make_tiny(), tmp_path, tmp_path / "stopped", TrainConfig(steps=6, lr=1e-3))


def test_a_compressed_model_is_refused(tmp_path):
    compressed, _ = _compressed_tiny(tmp_path)
    with pytest.raises(ValueError, match="compressed model cannot be fine-tuned in full"):
        _train(compressed.model, tmp_path, tmp_path / "run")


def test_the_cli_writes_a_model_directory_that_loads_and_generates(tmp_path, tiny_dir):
    data = chat_file(tmp_path / "d.jsonl")
    out = tmp_path / "tuned"
    args = ("posttrain", "sft", "--full", "--model", str(tiny_dir), "--data", str(data))
    args += ("--name", "tuned", "--steps", "3", "--batch-size", "2", "--lr", "1e-3")
    done = afm(*args, "--out", str(out), "--json", home=tmp_path / "home")
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert summary["full"] and summary["steps"] == 3 and summary["path"] == str(out)

    base, tuned = load_pretrained(tiny_dir), load_pretrained(out)
    record = json.loads((out / "training.json").read_text())
    assert record["base_signature"] == base.signature() != tuned.signature()
    assert record["training"]["settings"]["steps"] == 3
    changed = [
        name
        for name, tensor in tuned.model.state_dict().items()
        if not torch.equal(tensor, base.model.state_dict()[name])
    ]
    assert len(changed) > len(tuned.model.state_dict()) // 2

    gen = afm("generate", "two plus two?", "--model", str(out), "--max-tokens", "4", "--json")
    assert gen.returncode == 0, gen.stderr.decode()

    weights = (out / "model.safetensors").read_bytes()
    again = afm(*args, "--out", str(out), home=tmp_path / "home")  # as after a kill past the save
    assert again.returncode == 0, again.stderr.decode()
    assert (out / "model.safetensors").read_bytes() == weights
    assert_one_line_error(
        afm(*args, "--steps", "4", "--out", str(out), home=tmp_path / "home"), 1, "already exists"
    )
    assert_one_line_error(
        afm(*args, "--init-from", "x", home=tmp_path / "home"), 2, "--full trains the base"
    )
