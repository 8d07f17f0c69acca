"""Evaluation: task quality (ROUGE with bootstrap intervals), and later perplexity/KL and safety."""

from openafm.eval.rouge import bootstrap_ci, rouge_per_example, rouge_report

__all__ = ["bootstrap_ci", "rouge_per_example", "rouge_report"]
