"""Training data: windows of `seq_len + 1` tokens, a held-out slice, and a deterministic order.

Sources are token-shard folders (`afm data tokenize`), or plain-text / JSONL files tokenized
when the run starts. Each source is cut into non-overlapping windows; the last `val_fraction`
of every source's windows is held out. Training windows are drawn in a seeded permutation per
epoch, so the batch of step `s` is a pure function of `s`: resuming needs only the step, and
every mesh reads the same global batch (each data-parallel rank takes its rows).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from openafm.files import open_text
from openafm.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".txt.gz", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


class DataError(ValueError):
    """Training data that cannot be read or does not fit the run."""


def _read_text(path: Path) -> str:
    try:
        with open_text(path) as f:
            return f.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text: {exc}") from None


def _tokenize_file(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """A text file as one document, or a JSONL file's `text` fields, each ended by end-of-text."""
    text = _read_text(path)
    if path.name.endswith(JSONL_SUFFIXES):
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    documents.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(
                        f"{path}:{number}: not a JSON object with a text field"
                    ) from None
        pieces = [[*ids, tokenizer.eos_id] for ids in tokenizer.encode_documents(documents)]
    else:  # paragraphs encode in parallel and join where the text had a blank line
        paragraphs = re.split(r"(?<=\n\n)", text)
        pieces = [*tokenizer.encode_documents(paragraphs), [tokenizer.eos_id]]
    return np.fromiter((t for ids in pieces for t in ids), dtype=np.int64)


def read_source(path: str | Path, tokenizer: Tokenizer | None) -> list[np.ndarray]:
    """The token arrays of one `--data` path (a shard folder gives one array per shard)."""
    path = Path(path)
    if path.is_dir():
        from openafm.data.shards import read_shards  # only shard folders need the data package

        try:
            _, arrays = read_shards(path)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(str(exc)) from None
        return list(arrays)
    if not path.is_file():
        raise DataError(f"training data not found: {path}")
    if not path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
        raise DataError(
            f"{path}: use a token-shard folder, or a {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
            " file"
        )
    if tokenizer is None or tokenizer.eos_id is None:
        raise DataError(f"{path}: text needs a tokenizer with an end-of-text token")
    return [_tokenize_file(path, tokenizer)]


class TokenWindows:
    """Windows over token arrays, split into training and held-out windows."""

    def __init__(
        self, arrays: Sequence[np.ndarray], seq_len: int, vocab_size: int, val_fraction: float
    ) -> None:
        self.arrays = list(arrays)
        self.seq_len = seq_len
        train, val = [], []
        for a, array in enumerate(self.arrays):
            n = (len(array) - 1) // seq_len
            if n == 0:
                continue
            held = min(n - 1, max(1, round(n * val_fraction))) if val_fraction else 0
            starts = np.arange(n, dtype=np.int64) * seq_len
            index = np.stack([np.full(n, a, dtype=np.int64), starts], axis=1)
            train.append(index[: n - held])
            val.append(index[n - held :])
        if not train:
            raise DataError(f"the data holds no window of {seq_len + 1} tokens")
        self.train = np.concatenate(train)
        self.val = np.concatenate(val)
        top = max(int(np.max(a)) for a in self.arrays if len(a))
        if top >= vocab_size:
            raise DataError(
                f"token id {top} is outside the model's vocabulary of {vocab_size}:"
                " was the data tokenized with another tokenizer?"
            )

    def tokens(self, index: np.ndarray) -> np.ndarray:
        """`(len(index), seq_len + 1)` token ids of the windows `index` (rows of (array, start))."""
        out = np.empty((len(index), self.seq_len + 1), dtype=np.int64)
        for row, (a, start) in enumerate(index):
            out[row] = self.arrays[a][start : start + self.seq_len + 1]
        return out

    def fingerprint(self) -> dict[str, int]:
        """What a resumed run checks to know it reads the same data."""
        return {"train_windows": len(self.train), "val_windows": len(self.val)}


class BatchOrder:
    """The global batch of every step: `batch_size` training windows in a seeded order."""

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, rng.permutation(len(self.windows.train))
        return self._perm

    def rows(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The rows of step `step`'s global batch that data-parallel rank `rank` of `world` reads."""
        if self.batch_size % world:
            raise DataError(
                f"batch_size {self.batch_size} is not divisible by the {world} data-parallel ranks"
            )
        share = self.batch_size // world
        n = len(self.windows.train)
        first = step * self.batch_size + rank * share
        picks = []
        for i in range(first, first + share):
            picks.append(self._permutation(i // n)[i % n])
        return torch.from_numpy(self.windows.tokens(self.windows.train[picks]))

    def epoch(self, step: int) -> float:
        return step * self.batch_size / len(self.windows.train)


def held_out_batches(
    windows: TokenWindows, batch_size: int, batches: int, rank: int = 0, world: int = 1
) -> list[torch.Tensor]:
    """This rank's rows of up to `batches` held-out batches (fewer when the slice is small)."""
    total = min(len(windows.val), batches * batch_size)
    total -= total % world
    out = []
    for start in range(0, total, batch_size):
        chunk = windows.val[start : min(start + batch_size, total)]
        share = len(chunk) // world
        out.append(torch.from_numpy(windows.tokens(chunk[rank * share : (rank + 1) * share])))
    return out


def load_windows(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer | None,
    seq_len: int,
    vocab_size: int,
    val_fraction: float,
) -> TokenWindows:
    """Windows over every `--data` path (shard folders, text or JSONL files)."""
    if not paths:
        raise DataError("no training data: pass --data PATH (a shard folder, .txt or .jsonl)")
    arrays = [array for path in paths for array in read_source(path, tokenizer)]
    return TokenWindows(arrays, seq_len, vocab_size, val_fraction)
