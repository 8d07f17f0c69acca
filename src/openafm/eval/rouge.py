"""ROUGE-1/2/L of summaries against one or more human references, with bootstrap intervals.

Scores are F-measures from Google's `rouge-score` package (Porter stemming on); with several
references an example scores its best match (`score_multi`). The 95% interval resamples the
examples (percentile bootstrap, fixed seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer

from openafm.eval.intervals import bootstrap_ci

METRICS = ("rouge1", "rouge2", "rougeL")


def rouge_per_example(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, np.ndarray]:
    """F-measure of each prediction against its best reference, per metric."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    rows = [
        scorer.score_multi(list(refs), pred)
        for pred, refs in zip(predictions, references, strict=True)
    ]
    return {m: np.array([r[m].fmeasure for r in rows]) for m in METRICS}


def rouge_report(
    predictions: Sequence[str], references: Sequence[Sequence[str]], *, seed: int = 0
) -> dict[str, object]:
    """`{"n", "rouge1", "rouge2", "rougeL", "<metric>_ci", "mean_words"}` (scores in 0..1)."""
    if not predictions:
        raise ValueError("no summaries to score")
    scores = rouge_per_example(predictions, references)
    report: dict[str, object] = {"n": len(predictions)}
    for metric, values in scores.items():
        report[metric] = round(float(values.mean()), 4)
        report[f"{metric}_ci"] = [round(x, 4) for x in bootstrap_ci(values, seed=seed)]
    report["mean_words"] = round(float(np.mean([len(p.split()) for p in predictions])), 2)
    return report
