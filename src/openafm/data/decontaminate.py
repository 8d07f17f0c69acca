"""Decontamination: drop documents that share a word 13-gram with an evaluation set.

An n-gram found in many corpus documents (a licence line, a famous quotation) says nothing
about a leak, so n-grams present in more than `max_docs` documents are ignored. That needs the
whole corpus: one pass counts, per evaluation n-gram, the documents containing it; a second
pass filters.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

_WORD = re.compile(r"\w+")


def ngram_hashes(text: str, n: int = 13) -> set[int]:
    """64-bit hashes of the lower-cased word n-grams of `text` (stable across processes)."""
    words = _WORD.findall(text.lower())
    return {xxhash.xxh64_intdigest(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def eval_texts(path: Path) -> list[str]:
    """Every text field of an evaluation file: JSONL, JSON, CSV/TSV, or plain text."""
    name = path.name.lower()
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [s for row in rows for s in _strings(row)]
    if name.endswith(".json"):
        return _strings(json.loads(path.read_text()))
    if name.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t" if name.endswith(".tsv") else ",")
            return [cell for row in reader for cell in row]
    return [path.read_text(encoding="utf-8", errors="replace")]


def build_eval_index(paths: list[str], n: int, out: Path) -> int:
    """Hash every n-gram of the evaluation sets into a sorted array at `out`; return its size."""
    hashes: set[int] = set()
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation set not found: {path}")
        for text in eval_texts(path):
            hashes |= ngram_hashes(text, n)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.array(sorted(hashes), dtype=np.uint64))
    return len(hashes)


def _overlap(text: str, index: np.ndarray, n: int) -> set[int]:
    doc = np.fromiter(ngram_hashes(text, n), dtype=np.uint64)
    return set(doc[np.isin(doc, index, assume_unique=True)].tolist())


class EvalNgramCounter(PipelineStep):
    """Pass 1: for each evaluation n-gram, how many of this task's documents contain it."""

    name = "🧮 eval n-gram counts"
    type = "🧹 - DECONTAMINATE"

    def __init__(self, index_file: str, counts_dir: str, n: int = 13):
        super().__init__()
        self.index_file, self.counts_dir, self.n = index_file, counts_dir, n

    def run(
        self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1
    ) -> DocumentsPipeline:
        index = np.load(self.index_file)
        counts: Counter[int] = Counter()
        for doc in data or []:
            self.stat_update("documents")
            counts.update(_overlap(doc.text, index, self.n))
        path = Path(self.counts_dir) / f"{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({str(k): v for k, v in counts.items()}))
        yield from ()


class Decontaminate(BaseFilter):
    """Pass 2: drops documents sharing a not-common n-gram with an evaluation set."""

    name = "🧹 decontaminate"

    def __init__(
        self,
        index_file: str,
        counts_dir: str,
        n: int = 13,
        max_docs: int = 10,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.index_file, self.counts_dir, self.n, self.max_docs = (
            index_file,
            counts_dir,
            n,
            max_docs,
        )
        self._index: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        counts: Counter[int] = Counter()
        for path in Path(self.counts_dir).glob("*.json"):
            counts.update({int(k): v for k, v in json.loads(path.read_text()).items()})
        index = np.load(self.index_file)
        common = np.array([h for h, c in counts.items() if c > self.max_docs], dtype=np.uint64)
        return index[~np.isin(index, common)]

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._index is None:
            self._index = self._load()
        shared = _overlap(doc.text, self._index, self.n)
        if shared:
            doc.metadata["eval_ngrams"] = len(shared)
            return False, "eval_overlap"
        return True
