"""Model-based quality: a fastText classifier of reference-quality text vs raw web text.

`train_quality_model` fits it on two corpora (positive: e.g. curated answers and encyclopedic
text; negative: raw page text) with a held-out split, and reports accuracy and ROC AUC;
`QualityScore` is the pipeline stage that scores each document and keeps those at or above a
threshold.
"""

from __future__ import annotations

import gzip
import json
import random
import tempfile
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from openafm.data.readers import HTML_SUFFIXES, WARC_SUFFIXES, read_web_file

LABEL = "__label__hq"


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
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
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


def _line(text: str, positive: bool) -> str:
    return f"{LABEL if positive else '__label__lq'} {' '.join(text.split())}\n"


def probability_hq(model, text: str) -> float:
    labels, probs = model.predict(" ".join(text.split()), k=2)
    return float(dict(zip(labels, probs, strict=False)).get(LABEL, 0.0))


def train_quality_model(
    positive: list[str],
    negative: list[str],
    out: Path | str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    epochs: int = 25,
) -> dict:
    """Fit, evaluate on a held-out split, refit on everything, save to `out`; return metrics.

    Both fits are quantized before use, so the metrics describe the model that is saved.
    """
    import fasttext

    rng = random.Random(seed)
    data = [(t, True) for t in positive] + [(t, False) for t in negative]
    rng.shuffle(data)
    n_test = max(1, int(len(data) * test_fraction))
    test, train = data[:n_test], data[n_test:]
    settings = {
        "epoch": epochs,
        "lr": 0.5,
        "wordNgrams": 2,
        "dim": 32,
        "bucket": 200_000,  # hashed bigram rows; fastText's default (2M) makes a 400 MB file
        "minCount": 1,
        "seed": seed,
        "thread": 1,
    }

    def fit(rows: list[tuple[str, bool]]):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.writelines(_line(t, p) for t, p in rows)
        try:
            model = fasttext.train_supervised(input=f.name, verbose=0, **settings)
        finally:
            Path(f.name).unlink()
        model.quantize(qnorm=True, cutoff=20_000, retrain=False)  # product-quantized, ~1-4 MB
        return model

    held_out = fit(train)
    scores = np.array([probability_hq(held_out, t) for t, _ in test])
    labels = np.array([p for _, p in test])
    metrics = {
        "train_examples": len(train),
        "test_examples": len(test),
        "positive": len(positive),
        "negative": len(negative),
        "accuracy": float(((scores >= 0.5) == labels).mean()),
        "roc_auc": roc_auc(scores, labels),
        "settings": settings,
    }
    model = fit(data)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    model.save_model(str(tmp))
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=2) + "\n")
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
            import fasttext

            self._model = fasttext.load_model(self.model_path)
        score = probability_hq(self._model, doc.text)
        doc.metadata["quality"] = round(score, 4)
        return True if score >= self.threshold else (False, "low_quality")
