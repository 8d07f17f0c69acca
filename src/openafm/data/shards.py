"""Token shards for pre-training: `.bin` memmaps of token ids plus a `manifest.json`.

Each document's ids are followed by the tokenizer's end-of-text id, and documents are packed
back to back; a shard closes once it holds `shard_tokens` tokens (a document never spans two
shards). The manifest records the tokenizer, dtype, counts and each file's sha256, so a
trainer can check what it reads. Files are written under temporary names and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from openafm.data.readers import JSONL_SUFFIXES
from openafm.files import open_text, sha256_file, write_json_atomic
from openafm.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "openafm-token-shards/1"
SHARD_DTYPES = ("uint16", "uint32")


def iter_documents(folder: Path | str) -> Iterator[str]:
    """Texts of the JSONL (optionally gzip) documents in `folder`, in file-name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"documents folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.name.endswith(JSONL_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no .jsonl or .jsonl.gz documents in {folder}")
    for path in files:
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]


def write_shards(
    documents: Path | str,
    out: Path | str,
    tokenizer: Tokenizer,
    *,
    tokenizer_name: str = "",
    shard_tokens: int = 1 << 24,
    batch_size: int = 256,
) -> dict:
    """Tokenize the documents in `documents` (e.g. `curate`'s `kept/`) into shards under `out`."""
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: list[np.ndarray] = []
    pending_docs = pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_docs, pending_tokens
        if not pending:
            return
        name = f"shard-{len(shards):05d}.bin"
        tmp = out / f".{name}.tmp"
        tokens = np.concatenate(pending).astype(dtype)
        tokens.tofile(tmp)
        os.replace(tmp, out / name)
        shards.append(
            {
                "file": name,
                "tokens": int(tokens.size),
                "documents": pending_docs,
                "sha256": sha256_file(out / name),
            }
        )
        pending, pending_docs, pending_tokens = [], 0, 0

    texts = iter_documents(documents)
    while True:
        batch = [t for _, t in zip(range(batch_size), texts, strict=False)]
        if not batch:
            break
        for ids in tokenizer.encode_documents(batch):
            pending.append(np.asarray([*ids, tokenizer.eos_id], dtype=np.int64))
            pending_docs += 1
            pending_tokens += len(ids) + 1
            if pending_tokens >= shard_tokens:
                flush()
    flush()
    if not shards:
        raise ValueError(f"no documents in {documents}")
    manifest = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {
            "name": tokenizer_name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "source": str(Path(documents).resolve()),
        "shards": shards,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _checked_manifest(path: Path) -> dict:
    """The manifest, with every field `read_shards` relies on checked (ValueError if not)."""
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a manifest of format {FORMAT!r}")
    if manifest.get("dtype") not in SHARD_DTYPES:
        raise ValueError(f"{path}: dtype must be one of {', '.join(SHARD_DTYPES)}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{path}: 'shards' must be a list")
    for shard in shards:
        ok = (
            isinstance(shard, dict)
            and isinstance(shard.get("file"), str)
            and Path(shard["file"]).name == shard["file"] not in ("", ".", "..")
            and isinstance(shard.get("tokens"), int)
            and not isinstance(shard["tokens"], bool)
            and shard["tokens"] >= 0
            and isinstance(shard.get("sha256"), str)
        )
        if not ok:
            raise ValueError(
                f"{path}: each shard needs a file name in the folder, a token count and a sha256"
            )
    return manifest


def read_shards(folder: Path | str, *, verify: bool = True) -> tuple[dict, list[np.memmap]]:
    """The manifest and one read-only memmap per shard; `verify` checks sizes and sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: not a token-shard folder")
    manifest = _checked_manifest(path)
    arrays = []
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {path} but missing")
        if verify and sha256_file(file) != shard["sha256"]:
            raise ValueError(f"{file}: checksum mismatch (corrupt or changed since it was written)")
        if file.stat().st_size != shard["tokens"] * np.dtype(manifest["dtype"]).itemsize:
            raise ValueError(f"{file}: its size does not hold the {shard['tokens']} tokens listed")
        arrays.append(np.memmap(file, dtype=manifest["dtype"], mode="r"))
    return manifest, arrays
