"""Adapter training on the tiny model: the loss mask, learning, a frozen base, kill-and-resume,
and the `afm adapter` commands with their one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openafm.adapters import LoraAdapter, LoraConfig, load_adapter
from openafm.adapters.sft_data import SftDataError, read_conversations, tokenize_conversation
from openafm.adapters.trainer import TrainConfig, train_adapter
from tests.conftest import byte_tokenizer, make_tiny
from tests.test_cli import afm, assert_one_line_error

PAIRS = [("colour of the sky?", "blue"), ("two plus two?", "four"), ("capital of France?", "Paris")]


def chat_file(path: Path, repeat: int = 4) -> Path:
    lines = []
    for _ in range(repeat):
        for q, a in PAIRS:
            lines.append(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": a},
                        ]
                    }
                )
            )
    lines.append(json.dumps({"prompt": "say hi", "completion": "hi"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_only_assistant_turns_are_learned():
    tok = byte_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "second"},
    ]
    example = tokenize_conversation(tok, messages)
    assert list(example.ids) == tok.encode(tok.render_chat(messages, add_generation_prompt=False))
    learned = tok.decode(
        [i for i, keep in zip(example.ids, example.learn, strict=True) if keep],
        skip_special_tokens=False,
    )
    assert learned == "first answer<|im_end|>\nsecond<|im_end|>\n"


def test_training_learns_and_leaves_the_base_untouched(tmp_path):
    tok = byte_tokenizer()
    model = make_tiny()
    with torch.no_grad():  # a random tiny model's logits are too flat to memorise anything
        model.embed.weight.mul_(25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [
        tokenize_conversation(tok, m) for m in read_conversations(chat_file(tmp_path / "d.jsonl"))
    ]
    adapter = LoraAdapter.fresh("t", model, LoraConfig(rank=8))
    config = TrainConfig(steps=60, lr=1e-2, batch_size=4, warmup_steps=5, bf16=False)
    losses = []
    train_adapter(
        model,
        adapter,
        examples,
        tmp_path / "run",
        config,
        pad_id=tok.eos_id,
        data_checksum="x",
        on_step=lambda r: losses.append(r.loss),
    )
    assert losses[-1] < 0.1 * losses[0]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(adapter.parameters())


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no examples"),
        ('{"messages": [}\n', "not valid JSON"),
        ('{"text": "x"}\n', "needs 'messages'"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', "no assistant message"),
    ],
)
def test_bad_training_data_is_named(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SftDataError, match=message):
        read_conversations(path)


def _train_cmd(model_dir: Path, data: Path, tmp: Path, steps: int) -> list[str]:
    return [
        "adapter",
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--name",
        "resume",
        "--rank",
        "4",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--out",
        str(tmp / "out"),
        "--run-dir",
        str(tmp / "run"),
        "--json",
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_killed_training_resumes_to_the_same_loss(tiny_dir, tmp_path):
    data = chat_file(tmp_path / "d.jsonl", repeat=20)
    steps = 200
    whole = afm(*_train_cmd(tiny_dir, data, tmp_path / "whole", steps))
    assert whole.returncode == 0, whole.stderr.decode()
    expected = json.loads(whole.stdout)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "openafm", *_train_cmd(tiny_dir, data, cut, steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = cut / "run" / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 25:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut / "out").exists()

    resumed = afm(*_train_cmd(tiny_dir, data, cut, steps))
    assert resumed.returncode == 0, resumed.stderr.decode()
    got = json.loads(resumed.stdout)
    assert 20 <= got["resumed_from"] < steps
    assert got["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-5)
    reference = _losses(tmp_path / "whole" / "run")
    logged = [json.loads(line).get("step") for line in (cut / "run" / "metrics.jsonl").open()]
    assert [s for s in logged if s is not None] == list(range(1, steps + 1))  # none twice
    for step, loss in _losses(cut / "run").items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    saved = (cut / "out" / "adapter.safetensors").read_bytes()
    again = afm(*_train_cmd(tiny_dir, data, cut, steps))  # as if killed after saving
    assert again.returncode == 0, again.stderr.decode()
    assert (cut / "out" / "adapter.safetensors").read_bytes() == saved
    a, b = load_adapter(tmp_path / "whole" / "out"), load_adapter(cut / "out")
    for path, (a1, b1) in a.pairs.items():
        torch.testing.assert_close(b.pairs[path][0], a1, rtol=0, atol=1e-2)
        torch.testing.assert_close(b.pairs[path][1], b1, rtol=0, atol=1e-2)


def test_adapter_commands_end_to_end(tiny_dir, tmp_path):
    home = tmp_path / "home"
    data = chat_file(tmp_path / "d.jsonl")
    trained = afm(
        "adapter",
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--name",
        "mine",
        "--rank",
        "4",
        "--steps",
        "3",
        "--batch-size",
        "2",
        home=home,
    )
    assert trained.returncode == 0, trained.stderr.decode()
    listed = json.loads(afm("adapter", "list", "--json", home=home).stdout)
    mine = next(a for a in listed if a["name"] == "mine")
    assert mine["source"] == "user" and mine["rank"] == 4
    shown = json.loads(afm("adapter", "show", "mine", home=home).stdout)
    assert shown["training"]["settings"]["steps"] == 3 and shown["training"]["data_sha256"]
    assert shown["training"]["command"].startswith("afm adapter train")

    gen = afm(
        "generate",
        "two plus two?",
        "--model",
        str(tiny_dir),
        "--adapter",
        "mine",
        "--max-tokens",
        "4",
        "--json",
        home=home,
    )
    assert gen.returncode == 0, gen.stderr.decode()
    assert json.loads(gen.stdout)["adapter"] == "mine"

    assert (
        afm("adapter", "export", "mine", "--out", str(tmp_path / "peft"), home=home).returncode == 0
    )
    imported = afm(
        "adapter",
        "import",
        str(tmp_path / "peft"),
        "--name",
        "back",
        "--model",
        str(tiny_dir),
        home=home,
    )
    assert imported.returncode == 0, imported.stderr.decode()
    a, b = load_adapter(home / "adapters" / "mine"), load_adapter(home / "adapters" / "back")
    assert all(torch.equal(a.pairs[p][1], b.pairs[p][1]) for p in a.pairs)

    assert afm("adapter", "rm", "back", home=home).returncode == 0
    assert_one_line_error(afm("adapter", "show", "back", home=home), 1, "unknown adapter 'back'")
    assert_one_line_error(
        afm("generate", "x", "--model", str(tiny_dir), "--adapter", "../../etc", home=home),
        1,
        "is not an adapter",
    )
    assert_one_line_error(afm("adapter", "rm", "..", home=home), 1, "invalid adapter name")
    assert_one_line_error(
        afm("generate", "x", "--model", str(tiny_dir), "--adapter", "nope", home=home),
        1,
        "unknown adapter 'nope'",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 3}\n')
    train = ("adapter", "train", "--model", str(tiny_dir))
    for args, message in [
        (("--data", str(bad), "--name", "x"), "bad.jsonl:1"),
        (("--data", str(data), "--name", "x", "--rank", "99"), "exceeds the width"),
        (("--data", str(data), "--name", "mine"), "already exists"),
    ]:
        assert_one_line_error(afm(*train, *args, home=home), 1, message)


def test_init_from_copies_an_adapter_and_checks_its_base(tmp_path):
    from openafm.adapters import save_adapter
    from openafm.adapters.sft import SftRun, initial_adapter
    from openafm.io import model_signature

    model = make_tiny()
    signature = model_signature(model.config, model.state_dict())
    source = LoraAdapter.fresh("recovery", model, LoraConfig(rank=4), seed=9)
    with torch.no_grad():
        for _, b in source.pairs.values():
            b.fill_(0.5)
    source.metadata["base_signature"] = signature
    save_adapter(source, tmp_path / "recovery")
    run = SftRun("feature", tmp_path / "out", tmp_path / "run", init_from=tmp_path / "recovery")
    start = initial_adapter(run, model, LoraConfig(), signature, seed=0)
    assert start.name == "feature" and start.config.rank == 4
    assert start.metadata == {"init_from": "recovery"}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in start.parameters())
    for path, (a, b) in source.pairs.items():
        assert torch.equal(start.pairs[path][0], a.bfloat16().float())
        assert torch.equal(start.pairs[path][1], b)
    with pytest.raises(ValueError, match="trained on base"):
        initial_adapter(run, model, LoraConfig(), "another-base", seed=0)
