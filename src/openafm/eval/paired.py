"""Paired comparisons of two variants on the same prompts: McNemar's exact test on per-prompt
outcomes, a prompt-clustered bootstrap interval of the difference, and the smallest difference
the comparison could detect.

Outcomes come from the suites' per-example rows (`--predictions` files): IFEval rows give
prompt-level (all instructions followed) and instruction-level outcomes (clustered by prompt);
safety rows give refusals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

METRICS = (
    "prompt_strict",
    "prompt_loose",
    "instruction_strict",
    "instruction_loose",
    "refusal",
    "over_refusal",  # refusals of safe prompts (XSTest)
    "violation",  # harmful prompts answered (AdvBench, HarmBench, XSTest's unsafe ones)
)
PER_PROMPT = ("refusal", "over_refusal", "violation")


def _counted(row: Mapping[str, object], metric: str) -> bool:
    """Whether the row counts for `metric` (over-refusal: safe prompts; violation: unsafe)."""
    if metric == "over_refusal":
        return bool(row.get("safe"))
    if metric == "violation":
        return not row.get("safe", False)
    return True


def mcnemar_exact(before: Sequence[bool], after: Sequence[bool]) -> dict[str, float]:
    """Two-sided exact McNemar test: the discordant pairs under H0 split as Binomial(n, 1/2)."""
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}


def outcomes(row: Mapping[str, object], metric: str) -> list[bool]:
    """The row's outcomes for `metric`: one per prompt, or one per instruction."""
    field = "refusal" if metric in PER_PROMPT else metric.partition("_")[2]
    if field not in row:
        kind = "safety" if metric in PER_PROMPT else "IFEval"
        other = "an IFEval metric" if metric in PER_PROMPT else "refusal, over_refusal or violation"
        raise ValueError(f"{metric} compares {kind} rows, and these have no {field!r}: use {other}")
    if metric in ("refusal", "over_refusal"):
        return [bool(row["refusal"])]
    if metric == "violation":
        return [not row["refusal"]]
    level, _, strictness = metric.partition("_")
    followed = [bool(x) for x in row[strictness]]  # type: ignore[attr-defined]
    return [all(followed)] if level == "prompt" else followed


def compare(
    before: Sequence[Mapping[str, object]],
    after: Sequence[Mapping[str, object]],
    metric: str,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, object]:
    """`after` minus `before` on the prompts both hold (matched by key or id): the rates, the
    difference with a 95% prompt-clustered bootstrap interval, McNemar's test (prompt-level
    outcomes) and the smallest difference detectable at the 5% level with 80% power."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}")

    def by_key(rows: Sequence[Mapping[str, object]]) -> dict[str, Mapping[str, object]]:
        return {str(r.get("key", r.get("id"))): r for r in rows}

    first, second = by_key(before), by_key(after)
    keys = [k for k in first if k in second and _counted(first[k], metric)]
    if not keys:
        raise ValueError("the two files share no prompt (matched by 'key' or 'id')")
    pairs = [(outcomes(first[k], metric), outcomes(second[k], metric)) for k in keys]
    if any(len(b) != len(a) for b, a in pairs):
        raise ValueError("a prompt carries different instructions in the two files")
    b_sum = np.array([sum(b) for b, _ in pairs], dtype=float)
    a_sum = np.array([sum(a) for _, a in pairs], dtype=float)
    sizes = np.array([len(b) for b, _ in pairs], dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(resamples, len(keys)))
    diffs = (a_sum[draws].sum(1) - b_sum[draws].sum(1)) / sizes[draws].sum(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    result: dict[str, object] = {
        "metric": metric,
        "prompts": len(keys),
        "before": float(b_sum.sum() / sizes.sum()),
        "after": float(a_sum.sum() / sizes.sum()),
        "difference": float((a_sum.sum() - b_sum.sum()) / sizes.sum()),
        "difference_ci": [float(low), float(high)],
    }
    if metric.startswith("prompt") or metric in PER_PROMPT:
        test = mcnemar_exact([b[0] for b, _ in pairs], [a[0] for _, a in pairs])
        discordant = (test["gained"] + test["lost"]) / len(keys)
        # normal approximation: d = (z_0.975 + z_0.8) · sqrt(discordant share / n)
        detectable = (1.959964 + 0.841621) * math.sqrt(max(discordant, 1 / len(keys)) / len(keys))
        result |= {"mcnemar": test, "smallest_detectable_difference": detectable}
    return result
