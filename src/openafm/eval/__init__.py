"""Evaluation: task quality (ROUGE with bootstrap intervals), closeness to a reference model
(perplexity ratio, KL divergence, same top-1), and later safety."""

from openafm.eval.intervals import bootstrap_ci, bootstrap_ratio_ci, rate
from openafm.eval.quality import QualityReport, compare_models, reference_log_probs
from openafm.eval.rouge import rouge_per_example, rouge_report

__all__ = [
    "QualityReport",
    "bootstrap_ci",
    "bootstrap_ratio_ci",
    "compare_models",
    "rate",
    "reference_log_probs",
    "rouge_per_example",
    "rouge_report",
]
