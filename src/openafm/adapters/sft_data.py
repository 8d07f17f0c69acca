"""Supervised fine-tuning data: chat JSONL → token ids with a loss mask on assistant tokens.

Each line is `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ...,
"completion": ...}` (one user turn and its answer). Conversations are rendered with the
model's own chat template; only the assistant turns (including their end-of-turn token) are
learned. Batches group examples of similar length (length bucketing), in an order fixed by the
seed and epoch, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from openafm.files import JsonLinesError, read_jsonl
from openafm.tokenizer import Tokenizer

IGNORE = -100


class SftDataError(ValueError):
    """Training data is missing, empty or malformed."""


@dataclass(frozen=True)
class Example:
    """One tokenized conversation, or several packed (`starts`: where each begins): ids, and
    for each id whether it is learned."""

    ids: tuple[int, ...]
    learn: tuple[bool, ...]
    starts: tuple[int, ...] = (0,)

    @property
    def n_learned(self) -> int:
        return sum(self.learn)


def _messages_of(record: object, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise SftDataError(f"{where}: expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise SftDataError(f"{where}: 'messages' must be a list of {{role, content}} strings")
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        raise SftDataError(f"{where}: needs 'messages', or string 'prompt' and 'completion' fields")
    if not any(m["role"] == "assistant" for m in messages):
        raise SftDataError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """All conversations of a chat JSONL file; one clear error names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise SftDataError(f"training data {path} does not exist")
    try:
        conversations = [_messages_of(record, f"{path}:{n}") for n, record in read_jsonl(path)]
    except JsonLinesError as exc:
        raise SftDataError(str(exc)) from None
    if not conversations:
        raise SftDataError(f"training data {path} holds no examples")
    return conversations


def conversations_checksum(conversations: Sequence[Sequence[dict[str, str]]]) -> str:
    """sha256 of the conversations as canonical JSON: identifies the training data."""
    h = hashlib.sha256()
    for messages in conversations:
        h.update(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenize_conversation(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> Example:
    """Render with the chat template; learn each assistant turn's text and end-of-turn token."""
    ids: list[int] = []
    learn: list[bool] = []
    rendered = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:k], add_generation_prompt=True)
        full = tokenizer.render_chat(messages[: k + 1], add_generation_prompt=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise SftDataError("the chat template does not render turns as a growing prefix")
        context = tokenizer.encode(prompt[len(rendered) :], add_bos=False)
        answer = tokenizer.encode(full[len(prompt) :], add_bos=False)
        ids += context + answer
        learn += [False] * len(context) + [True] * len(answer)
        rendered = full
    return Example(tuple(ids), tuple(learn))


def tokenize_all(
    tokenizer: Tokenizer, conversations: Iterable[Sequence[dict[str, str]]], seq_len: int
) -> tuple[list[Example], int]:
    """Tokenized examples that fit `seq_len`, and how many were too long and left out."""
    kept, too_long = [], 0
    for messages in conversations:
        example = tokenize_conversation(tokenizer, messages)
        if len(example.ids) > seq_len:
            too_long += 1
        else:
            kept.append(example)
    return kept, too_long


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Conversations packed into rows of at most `seq_len` tokens (first fit, longest first).

    Each row's conversations stay apart in attention (`segment_ids`); the order is fixed, so a
    resumed run packs the same rows.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.ids)):
        if len(example.ids) > seq_len:
            raise ValueError(f"an example of {len(example.ids)} tokens exceeds seq_len {seq_len}")
        row = next((r for r, free in enumerate(room) if free >= len(example.ids)), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
        rows[row].append(example)
        room[row] -= len(example.ids)
    return [
        Example(
            tuple(itertools.chain.from_iterable(part.ids for part in parts)),
            tuple(itertools.chain.from_iterable(part.learn for part in parts)),
            tuple(itertools.accumulate((len(part.ids) for part in parts[:-1]), initial=0)),
        )
        for parts in rows
    ]


def epoch_batches(
    examples: Sequence[Example], batch_size: int, *, seed: int, epoch: int
) -> list[list[int]]:
    """Example indices per batch for one epoch: shuffled, then grouped by similar length.

    Indices are shuffled with (seed, epoch), sorted by length within windows of 50 batches,
    cut into batches, and the batches shuffled again, so padding is small and order random.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(tokens, labels)`; labels are the next token where it is learned, else -100."""
    width = max(len(e.ids) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        tokens[row, :n] = torch.tensor(e.ids)
        target = torch.tensor(e.ids[1:])
        learned = torch.tensor(e.learn[1:])
        for start in e.starts[1:]:  # a packed conversation is not predicted from the one before
            learned[start - 1] = False
        labels[row, : n - 1] = torch.where(learned, target, IGNORE)
    return tokens, labels


def segment_ids(examples: Sequence[Example]) -> torch.Tensor | None:
    """`(batch, width)` segment numbers for packed rows (padding is a segment of its own), or
    None when no row is packed (plain causal attention is then exact)."""
    if all(len(e.starts) == 1 for e in examples):
        return None
    width = max(len(e.ids) for e in examples)
    segments = torch.empty((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        bounds = [*e.starts, len(e.ids), width]
        for number, (start, end) in enumerate(itertools.pairwise(bounds)):
            segments[row, start:end] = number
    return segments
