"""File helpers every layer may use: content hashes, JSON Lines reading, atomic JSON (Lines) writes."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def open_text(path: str | Path, errors: str = "strict") -> IO[str]:
    """A UTF-8 text file, gunzipped on the fly when its name ends in `.gz`."""
    opener = gzip.open if str(path).endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors=errors)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) from a JSON Lines file, or from a CSV file (`.csv`: one dict
    per row, keyed by the header)."""
    if Path(path).suffix.lower() != ".csv":
        yield from read_jsonl(path)
        return
    with Path(path).open(newline="", encoding="utf-8") as f:
        yield from enumerate(csv.DictReader(f), 1)


class JsonLinesError(ValueError):
    """A line of a JSON Lines file is not valid JSON."""


def read_jsonl(path: Path, *, torn_end: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line (a `.gz` file is gunzipped); a bad line
    raises naming `path:line`. With `torn_end`, an unparsable last line without its newline (an
    append cut short by a kill) ends the file instead."""
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                if torn_end and not line.endswith("\n"):
                    return
                raise JsonLinesError(f"{path}:{n}: not valid JSON ({exc.msg})") from None


def write_jsonl_atomic(path: Path, rows: Iterable[Any]) -> None:
    """Write one JSON value per line under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_log(path: Path) -> list[Any]:
    """The records of an append-only JSON Lines log; a last line cut short by a kill is left out
    (any other bad line raises, naming `path:line`)."""
    return [record for _, record in read_jsonl(path, torn_end=True)]


def cut_log(path: Path, keep: Callable[[Any], bool]) -> list[Any]:
    """Keep the records of the log at `path` that `keep` accepts (a resumed run drops what came
    after its checkpoint, and a torn last line); returns them. No file: nothing to keep."""
    if not Path(path).exists():
        return []
    kept = [r for r in read_log(path) if keep(r)]
    write_jsonl_atomic(path, kept)
    return kept
