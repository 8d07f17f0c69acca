"""SFT packing: packed rows hold every conversation once, each attends only to itself, and
the packed loss is the sum of the conversations' own losses."""

from __future__ import annotations

import json
import random

import pytest
import torch

from openafm.adapters.sft_data import (
    Example,
    collate,
    pack,
    segment_ids,
    tokenize_conversation,
)
from openafm.adapters.trainer import answer_loss
from tests.conftest import byte_tokenizer, make_tiny
from tests.test_adapter_training import PAIRS
from tests.test_cli import afm


def _examples() -> list[Example]:
    tok = byte_tokenizer()
    return [
        tokenize_conversation(
            tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        )
        for q, a in PAIRS * 2
    ]


def test_pack_holds_every_example_once_within_the_row_length():
    rng = random.Random(0)
    examples = [
        Example(tuple(rng.randrange(100) for _ in range(n)), (False,) + (True,) * (n - 1))
        for n in [rng.randint(2, 40) for _ in range(60)]
    ]
    rows = pack(examples, 64)
    assert all(len(r.ids) <= 64 for r in rows)
    pieces = sorted(
        r.ids[start:end]
        for r in rows
        for start, end in zip(r.starts, [*r.starts[1:], len(r.ids)], strict=True)
    )
    assert pieces == sorted(e.ids for e in examples)
    assert len(rows) < len(examples) / 2
    assert sum(len(r.ids) for r in rows) == sum(len(e.ids) for e in examples)
    with pytest.raises(ValueError, match="exceeds seq_len"):
        pack(examples, 10)


def test_a_packed_conversation_sees_only_itself():
    model = make_tiny()
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    row = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        packed = model.hidden_states(row, segments=segments)
        alone = torch.cat([model.hidden_states(a), model.hidden_states(b)], dim=1)
        unpacked = model.hidden_states(row)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unpacked[:, 7:], alone[:, 7:], atol=1e-3)


def test_packed_loss_is_the_sum_of_each_conversations_loss():
    model = make_tiny()
    examples = _examples()
    rows = pack(examples, 200)
    assert len(rows) < len(examples)
    tokens, labels = collate(rows, 0)
    segments = segment_ids(rows)
    assert segments is not None
    with torch.no_grad():
        packed, n_packed = answer_loss(model, tokens, labels, bf16=False, segments=segments)
        alone = [answer_loss(model, *collate([e], 0), bf16=False) for e in examples]
    assert n_packed == sum(n for _, n in alone)
    torch.testing.assert_close(packed, sum(loss for loss, _ in alone), rtol=1e-4, atol=1e-4)
    assert segment_ids(examples) is None


def test_afm_adapter_train_pack_records_the_rows(tiny_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in PAIRS * 4)
    )
    out = tmp_path / "adapter"
    result = afm(
        "adapter", "train", "--data", str(data), "--name", "packed", "--model", str(tiny_dir),
        "--steps", "3", "--seq-len", "256", "--pack", "--batch-size", "2",
        "--out", str(out), "--run-dir", str(tmp_path / "run"), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    training = json.loads((out / "adapter.json").read_text())["training"]
    assert training["examples"] == 12
    assert 0 < training["packed_rows"] < 12
