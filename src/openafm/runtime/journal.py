"""Answers saved batch by batch as they are generated, so that a long run that is killed
resumes where it stopped and ends with what one uninterrupted run would have given."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from openafm.files import read_log, write_jsonl_atomic
from openafm.runtime.engine import Completion


def prompts_checksum(prompts: Sequence[str]) -> str:
    """sha256 of the prompts, in order."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def completion_from_dict(record: Mapping[str, object]) -> Completion:
    """The inverse of `Completion.to_dict`."""
    fields = {k: v for k, v in record.items() if k != "completion_tokens"}
    return Completion(**fields)  # type: ignore[arg-type]


class AnswerJournal:
    """An append-only JSON Lines file: a header naming the run (`key`: model, adapter, decoding,
    batching, the prompts' checksum), then one line per finished batch (the prompts' indices and
    their completions). A whole batch is one line, so a kill mid-write loses that batch only,
    and a resumed run regenerates it with the same companions. A file left by a different run
    is started afresh (`stale` says so)."""

    def __init__(self, path: Path, key: Mapping[str, object]) -> None:
        self.path = Path(path)
        self.key = json.loads(json.dumps(dict(key)))  # as it reads back from the file
        records = read_log(self.path) if self.path.exists() else []
        self.stale = bool(records) and records[0] != {"run": self.key}
        batches = [] if self.stale else records[1:]
        self.known: dict[int, Completion] = {
            int(i): completion_from_dict(c)
            for batch in batches
            for i, c in zip(batch["indices"], batch["completions"], strict=True)
        }
        write_jsonl_atomic(self.path, [{"run": self.key}, *batches])  # drops a torn last line

    def record(self, indices: Sequence[int], completions: Sequence[Completion]) -> None:
        """Append one finished batch and flush it to disk."""
        line = {"indices": list(indices), "completions": [c.to_dict() for c in completions]}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.known.update(zip(indices, completions, strict=True))
