"""The evaluation suites, each as the prompts it asks and the scoring of the answers.

A suite does not generate: `prompts()` gives what to ask (chat turns, or a feature's records)
and `score()` turns the answers into figures and one row per example (`SuiteResult`), so the
commands, the report and a re-scoring of saved answers all share one path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from openafm.eval import grades, ifeval, injection, safety
from openafm.eval.rouge import rouge_per_example, rouge_report
from openafm.features.summarize import SummaryFeature, clean_summary


@dataclass
class SuiteResult:
    """A suite's figures and its per-example rows (prompt, response, verdicts)."""

    figures: dict[str, object]
    rows: list[dict[str, object]] = field(default_factory=list)


def score_ifeval(
    prompts: Sequence[ifeval.IFEvalPrompt],
    responses: Sequence[str],
    cut: Sequence[bool] | None = None,
) -> SuiteResult:
    """IFEval figures; given which answers the token cap `cut`, also the bounds on what an
    unlimited budget could score."""
    verdicts = [ifeval.score(p, r) for p, r in zip(prompts, responses, strict=True)]
    rows: list[dict[str, object]] = [
        {
            "key": p.key,
            "prompt": p.prompt,
            "response": r,
            "instruction_id_list": list(p.instruction_ids),
            "strict": list(v.strict),
            "loose": list(v.loose),
        }
        for p, r, v in zip(prompts, responses, verdicts, strict=True)
    ]
    figures = ifeval.report(prompts, verdicts)
    if cut is not None:
        for row, c in zip(rows, cut, strict=True):
            row["cut_at_cap"] = c
        figures |= ifeval.cap_bounds(verdicts, cut)
    return SuiteResult(figures, rows)


def score_safety(
    kind: str, prompts: Sequence[safety.SafetyPrompt], responses: Sequence[str]
) -> SuiteResult:
    refusals = [safety.is_refusal(kind, r) for r in responses]
    rows = [
        {
            "id": p.id,
            "category": p.category,
            "safe": p.safe,
            "prompt": p.prompt,
            "response": r,
            "refusal": refused,
        }
        for p, r, refused in zip(prompts, responses, refusals, strict=True)
    ]
    return SuiteResult(safety.safety_report(kind, prompts, refusals), rows)


def score_summaries(
    feature: SummaryFeature, records: Sequence[Mapping[str, object]], replies: Sequence[str]
) -> SuiteResult:
    """ROUGE and graded summaries of the replies (cleaned to the summary line first)."""
    summaries = [clean_summary(r) for r in replies]
    references = [feature.references(r) for r in records]
    sources = [feature.input_of(r) for r in records]
    rouge_l = rouge_per_example(summaries, references)["rougeL"]
    bounds = grades.LENGTH_BOUNDS[feature.name]
    graded = [
        grades.grade(s, float(r), src, feature.instruction, bounds)
        for s, r, src in zip(summaries, rouge_l, sources, strict=True)
    ]
    buckets = grades.length_buckets([len(src.split()) for src in sources])
    figures = {
        "feature": feature.name,
        **rouge_report(summaries, references),
        **grades.grade_report(graded, buckets),
    }
    rows = [
        {
            "prompt": feature.prompt(src),
            "response": s,
            "references": refs,
            "input_words": len(src.split()),
            "length_bucket": b,
            "rougeL": round(float(r), 4),
            "grades": g,
        }
        for src, s, refs, r, g, b in zip(
            sources, summaries, references, rouge_l, graded, buckets, strict=True
        )
    ]
    return SuiteResult(figures, rows)


def score_injection(
    cases: Sequence[injection.InjectionCase],
    features: Mapping[str, SummaryFeature],
    responses: Sequence[str],
) -> SuiteResult:
    obeys = [injection.obeyed(r, c.canary) for r, c in zip(responses, cases, strict=True)]
    rows = [
        {
            "feature": c.feature,
            "template": c.template,
            "position": c.position,
            "canary": c.canary,
            "prompt": features[c.feature].prompt(features[c.feature].input_of(c.record)),
            "response": r,
            "obeyed": o,
        }
        for c, r, o in zip(cases, responses, obeys, strict=True)
    ]
    return SuiteResult(injection.injection_report(cases, obeys), rows)
