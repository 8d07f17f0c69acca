"""95% intervals for evaluation figures: percentile bootstrap over examples (fixed seed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000


def _percentiles(estimates: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: np.ndarray | Sequence[float],
    *,
    n_resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (a rate, for 0/1 values)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to resample")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_resamples, len(values)))].mean(axis=1)
    return _percentiles(means, level)


def bootstrap_ratio_ci(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    n_resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Interval of sum(numerators) / sum(denominators), resampling whole examples.

    For rates over units nested in examples (instructions within an IFEval prompt): resampling
    the examples keeps the units of one example together, as they are not independent.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.size == 0:
        raise ValueError("need as many numerators as denominators, at least one")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(num), (n_resamples, len(num)))
    totals = den[picks].sum(axis=1)
    ratios = num[picks].sum(axis=1) / np.where(totals > 0, totals, 1.0)
    return _percentiles(ratios, level)


def rate(values: Sequence[bool] | np.ndarray, *, seed: int = 0) -> dict[str, object]:
    """`{"rate", "ci", "n"}` for 0/1 outcomes (rounded to 4 places)."""
    array = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(array, seed=seed)
    return {
        "rate": round(float(array.mean()), 4),
        "ci": [round(low, 4), round(high, 4)],
        "n": int(array.size),
    }
