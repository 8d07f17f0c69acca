"""Graded summaries on the seed's scheme, with automatic proxies for its human graders.

Apple grades each summary on several dimensions; a summary is "good" when every dimension is
good, "poor" when any is poor, and "neutral" otherwise. Here each dimension is a documented,
automatic proxy (thresholds in `GRADE_RULES`, explained in docs/evaluation.md):

- relevance: ROUGE-L against the best human reference;
- length: words within the feature's bounds;
- faithfulness: numbers and capitalised names in the summary that occur in the source;
- repetition: no loops (a word 3-gram repeated);
- leakage: no copy of the prompt's instruction.

Rates come with 95% bootstrap intervals, overall and per input-length bucket (terciles of the
set's source lengths: the seed stratifies its graded sets the same way).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from openafm.eval.intervals import rate

GRADES = ("good", "neutral", "poor")


@dataclass(frozen=True)
class LengthBounds:
    """Words: `good` within [good_min, good_max], `poor` outside [poor_min, poor_max]."""

    good_min: int
    good_max: int
    poor_min: int
    poor_max: int


LENGTH_BOUNDS = {
    "summarize-email": LengthBounds(2, 12, 1, 20),  # a subject line
    "summarize-dialogue": LengthBounds(6, 60, 3, 90),  # one or two sentences
    "summarize-messages": LengthBounds(4, 50, 2, 80),
}
GRADE_RULES = {
    "relevance": "ROUGE-L >= 0.25 good, < 0.10 poor",
    "length": "words within the feature's bounds (LENGTH_BOUNDS)",
    "faithfulness": "all numbers and names found in the source good, under half poor",
    "repetition": "no repeated 3-gram good, a 3-gram three or more times poor",
    "leakage": "a run of 6 words of the instruction in the summary poor",
}
_WORD = re.compile(r"[\w'#]+")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _level(value: float, good: float, poor: float) -> str:
    return "good" if value >= good else "poor" if value < poor else "neutral"


def length_grade(summary: str, bounds: LengthBounds) -> str:
    words = len(summary.split())
    if bounds.good_min <= words <= bounds.good_max:
        return "good"
    return "neutral" if bounds.poor_min <= words <= bounds.poor_max else "poor"


def _names(text: str) -> set[str]:
    """Capitalised words of two or more letters that do not start a sentence."""
    names = set()
    for sentence in _SENTENCE_END.split(text.strip()):
        for word in _WORD.findall(sentence)[1:]:
            letters = word.strip("#'")
            if len(letters) > 1 and letters[0].isupper():
                names.add(word)
    return names


def faithfulness_grade(summary: str, source: str) -> str:
    """Share of the summary's numbers and mid-sentence capitalised words found in the source."""
    claims = set(_NUMBER.findall(summary)) | _names(summary)
    if not claims:
        return "good"
    found = sum(claim.lower() in source.lower() for claim in claims) / len(claims)
    return "good" if found == 1.0 else _level(found, 1.0, 0.5)


def repetition_grade(summary: str) -> str:
    words = _WORD.findall(summary.lower())
    counts = Counter(zip(words, words[1:], words[2:], strict=False))
    most = max(counts.values(), default=0)
    return "good" if most <= 1 else "neutral" if most == 2 else "poor"


def leakage_grade(summary: str, instruction: str, run: int = 6) -> str:
    said = " ".join(_WORD.findall(summary.lower()))
    words = _WORD.findall(instruction.lower())
    for start in range(max(len(words) - run + 1, 0)):
        if " ".join(words[start : start + run]) in said:
            return "poor"
    return "good"


def grade(
    summary: str, rouge_l: float, source: str, instruction: str, bounds: LengthBounds
) -> dict[str, str]:
    """Each dimension's grade and the overall one."""
    dims = {
        "relevance": _level(rouge_l, 0.25, 0.10),
        "length": length_grade(summary, bounds),
        "faithfulness": faithfulness_grade(summary, source),
        "repetition": repetition_grade(summary),
        "leakage": leakage_grade(summary, instruction),
    }
    values = set(dims.values())
    overall = "poor" if "poor" in values else "good" if values == {"good"} else "neutral"
    return {**dims, "overall": overall}


def length_buckets(source_words: Sequence[int]) -> list[str]:
    """short / medium / long by terciles of the set's source lengths (in words)."""
    low, high = np.percentile(np.asarray(source_words), [100 / 3, 200 / 3])
    return ["short" if w <= low else "medium" if w <= high else "long" for w in source_words]


def _rates(overall: Sequence[str]) -> dict[str, object]:
    return {g: rate([o == g for o in overall]) for g in GRADES}


def grade_report(grades: Sequence[dict[str, str]], buckets: Sequence[str]) -> dict[str, object]:
    """good/neutral/poor rates with intervals, overall, per length bucket and per dimension."""
    if not grades or len(grades) != len(buckets):
        raise ValueError(f"{len(grades)} grades for {len(buckets)} buckets")
    overall = [g["overall"] for g in grades]
    by_bucket = {
        b: _rates([o for o, ob in zip(overall, buckets, strict=True) if ob == b])
        for b in ("short", "medium", "long")
        if b in buckets
    }
    dimensions = {
        d: {g: round(sum(x[d] == g for x in grades) / len(grades), 4) for g in GRADES}
        for d in GRADE_RULES
    }
    return {
        "grades": _rates(overall),
        "grades_by_length": by_bucket,
        "grade_dimensions": dimensions,
        "grade_rules": GRADE_RULES,
    }
