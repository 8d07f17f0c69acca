"""One report for every model variant: each suite run, or read from its cache (the page itself
is `report_page`).

A result is cached under `OUT/cache/` keyed by the suite, the model's and adapter's
signatures, the data's checksum and the settings, so a second report regenerates nothing that
has not changed; each cached result keeps its per-example rows (JSONL) beside it.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from openafm import __version__
from openafm.eval import ifeval, injection, safety
from openafm.eval.grades import length_buckets
from openafm.eval.ifeval import MAX_NEW_TOKENS as IFEVAL_MAX_NEW_TOKENS
from openafm.eval.records import adapter_signature
from openafm.eval.suites import (
    SuiteResult,
    score_ifeval,
    score_injection,
    score_safety,
    score_summaries,
)
from openafm.features.summarize import FEATURES, SummaryFeature, replies
from openafm.files import read_records, sha256_file, write_json_atomic, write_jsonl_atomic
from openafm.runtime import Engine
from openafm.runtime.batches import greedy_chat_responses
from openafm.runtime.journal import AnswerJournal

SUITE_ORDER = (
    "aeslc",
    "dialogsum",
    "samsum",
    "injection",
    "xstest",
    "harmbench",
    "advbench",
    "ifeval",
)
SUMMARY_SETS = {
    "aeslc": "summarize-email",
    "dialogsum": "summarize-dialogue",
    "samsum": "summarize-messages",
}


@dataclass(frozen=True)
class Variant:
    """A model, optionally with one feature adapter."""

    model: str
    adapter: str | None = None

    @property
    def label(self) -> str:
        return self.model if self.adapter is None else f"{self.model} + {Path(self.adapter).name}"

    @property
    def feature(self) -> str | None:
        """The summarization feature the adapter serves (by its name), if any."""
        name = None if self.adapter is None else Path(self.adapter).name
        return name if name in FEATURES else None


@dataclass(frozen=True)
class SuiteData:
    """The data each suite reads (a suite without data is skipped) and its settings."""

    ifeval: Path | None = None
    advbench: Path | None = None
    harmbench: Path | None = None
    xstest: Path | None = None
    aeslc: Path | None = None
    dialogsum: Path | None = None
    samsum: Path | None = None
    limit: int | None = None  # the first examples of each suite (None: all)...
    summary_sample: int | None = None  # ...except summaries: a length-stratified sample
    ifeval_max_tokens: int = IFEVAL_MAX_NEW_TOKENS
    safety_max_tokens: int = 256
    injection_per_feature: int = 200
    batch_size: int = 8


Progress = Callable[[str, int], Callable[[int], None]]  # (title, total) -> advance(n)


def suites_for(variant: Variant, data: SuiteData) -> list[str]:
    """The suites a variant runs, the quickest first: for a base all; for an adapter its own
    feature's summaries and injections, then the general suites."""
    names = []
    for set_name, feature in SUMMARY_SETS.items():
        if getattr(data, set_name) and variant.feature in (None, feature):
            names.append(set_name)
    injectable = (None, "summarize-email", "summarize-dialogue")
    if data.aeslc and data.dialogsum and variant.feature in injectable:
        names.append("injection")
    return names + [n for n in SUITE_ORDER[4:] if getattr(data, n)]


def _data_files(suite: str, data: SuiteData) -> list[Path]:
    if suite == "injection":
        return [p for p in (data.aeslc, data.dialogsum) if p is not None]
    return [getattr(data, suite)]


def _settings(suite: str, data: SuiteData) -> dict[str, object]:
    """The settings that change a suite's answers (batches pad prompts: batch size counts)."""
    if suite == "injection":
        return {"per_feature": data.injection_per_feature, "batch_size": data.batch_size}
    settings: dict[str, object] = {"limit": data.limit, "batch_size": data.batch_size}
    if suite in SUMMARY_SETS:
        settings["summary_sample"] = data.summary_sample
    if suite == "ifeval":
        settings["max_tokens"] = data.ifeval_max_tokens
    elif suite in safety.KINDS:
        settings["max_tokens"] = data.safety_max_tokens
    return settings


def identity(
    suite: str, model_signature: str, variant: Variant, data: SuiteData
) -> dict[str, object]:
    """What a suite's result depends on: model, adapter, data checksums and settings."""
    return {
        "model": variant.model,
        "model_signature": model_signature,
        "adapter": variant.adapter,
        "adapter_signature": adapter_signature(variant.adapter),
        "data_sha256": [sha256_file(p) for p in _data_files(suite, data)],
        "settings": _settings(suite, data),
    }


def cache_key(suite: str, ident: Mapping[str, object]) -> str:
    material = {
        "suite": suite,
        "model_signature": ident["model_signature"],
        "adapter_signature": ident["adapter_signature"],
        "data": ident["data_sha256"],
        "settings": ident["settings"],
        "openafm": __version__,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def stratified_sample(
    records: Sequence[dict[str, object]], feature: SummaryFeature, size: int, seed: int = 0
) -> list[dict[str, object]]:
    """`size` records, a third from each tercile of input length (seeded; in input order)."""
    if size >= len(records):
        return list(records)
    buckets = length_buckets([len(feature.input_of(r).split()) for r in records])
    rng = random.Random(seed)
    chosen: list[int] = []
    for i, name in enumerate(("short", "medium", "long")):
        members = [j for j, b in enumerate(buckets) if b == name]
        share = size // 3 + (1 if i < size % 3 else 0)
        chosen += rng.sample(members, min(share, len(members)))
    return [records[j] for j in sorted(chosen)]


def _records(path: Path, limit: int | None) -> list[dict[str, object]]:
    records = [r for _, r in read_records(path)][:limit]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def run_suite(
    suite: str,
    engine: Engine,
    variant: Variant,
    data: SuiteData,
    advance: Callable[[int], None],
    journal: AnswerJournal | None = None,
) -> SuiteResult:
    """Generate the suite's answers with `engine` (batches in `journal` are not regenerated,
    except the injection suite's) and score them."""
    batch = {
        "adapter": variant.adapter,
        "batch_size": data.batch_size,
        "on_batch": advance,
        "journal": journal,
    }
    if suite == "ifeval":
        prompts = ifeval.read_prompts(data.ifeval)[: data.limit]  # type: ignore[arg-type]
        done, _ = greedy_chat_responses(
            engine, [p.prompt for p in prompts], max_tokens=data.ifeval_max_tokens, **batch
        )
        cut = [c.finish_reason == "length" for c in done]
        return score_ifeval(prompts, [c.text for c in done], cut)
    if suite in safety.KINDS:
        asked = safety.read_safety_prompts(getattr(data, suite), suite)[: data.limit]
        done, _ = greedy_chat_responses(
            engine, [p.prompt for p in asked], max_tokens=data.safety_max_tokens, **batch
        )
        return score_safety(suite, asked, [c.text for c in done])
    if suite in SUMMARY_SETS:
        feature = FEATURES[SUMMARY_SETS[suite]]
        records = _records(getattr(data, suite), data.limit)
        if data.summary_sample is not None:
            records = stratified_sample(records, feature, data.summary_sample)
        return score_summaries(feature, records, replies(engine, feature, records, **batch))
    if suite == "injection":
        return run_injection(engine, variant, data, advance)
    raise ValueError(f"unknown suite {suite!r}")


def run_injection(
    engine: Engine, variant: Variant, data: SuiteData, advance: Callable[[int], None]
) -> SuiteResult:
    """Injection cases for the prompted base (both features) or the adapter's own feature."""
    sets: list[tuple[SummaryFeature, list[dict[str, object]]]] = []
    for path, name in ((data.aeslc, "summarize-email"), (data.dialogsum, "summarize-dialogue")):
        if path is not None and variant.feature in (None, name):
            sets.append((FEATURES[name], _records(path, data.injection_per_feature)))
    cases = injection.make_cases(sets, per_feature=data.injection_per_feature)
    texts: dict[int, str] = {}
    for feature, _ in sets:
        mine = [i for i, c in enumerate(cases) if c.feature == feature.name]
        answers = replies(
            engine,
            feature,
            [cases[i].record for i in mine],
            adapter=variant.adapter,
            batch_size=data.batch_size,
            on_batch=advance,
        )
        texts |= dict(zip(mine, answers, strict=True))
    return score_injection(cases, FEATURES, [texts[i] for i in range(len(cases))])


def suite_size(suite: str, variant: Variant, data: SuiteData) -> int:
    """How many examples a suite generates (for progress bars)."""
    if suite == "injection":
        features = 2 if variant.feature is None else 1
        return features * data.injection_per_feature
    count = sum(1 for _ in read_records(getattr(data, suite)))
    count = min(count, data.limit or count)
    if suite in SUMMARY_SETS and data.summary_sample is not None:
        count = min(count, data.summary_sample)
    return count


def collect(
    variants: Sequence[Variant],
    data: SuiteData,
    out: Path,
    load: Callable[[str], tuple[Engine, str]],
    progress: Progress,
    log: Callable[[str], None] = lambda _: None,
    *,
    run_missing: bool = True,
) -> dict[str, dict[str, dict[str, object]]]:
    """figures[variant label][suite], each run once and cached under `out/cache/`; suite by
    suite (the quickest first) across the variants, so a stopped run has its quick suites."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    engines: dict[str, tuple[Engine, str]] = {}
    results: dict[str, dict[str, dict[str, object]]] = {v.label: {} for v in variants}
    order = list(dict.fromkeys(s for v in variants for s in suites_for(v, data)))
    order.sort(key=lambda s: SUITE_ORDER.index(s))
    for suite in order:
        for variant in (v for v in variants if suite in suites_for(v, data)):
            if variant.model not in engines:
                engines[variant.model] = load(variant.model)
            engine, signature = engines[variant.model]
            ident = identity(suite, signature, variant, data)
            key = cache_key(suite, ident)
            stored = cache / f"{suite}-{key}.json"
            if stored.is_file():
                results[variant.label][suite] = json.loads(stored.read_text())
                log(f"{variant.label}: {suite} from the cache ({stored.name})")
                continue
            if not run_missing:
                log(f"{variant.label}: {suite} not in the cache, left out")
                continue
            start = time.perf_counter()
            advance = progress(f"{variant.label}: {suite}", suite_size(suite, variant, data))
            journal = AnswerJournal(
                cache / f"{suite}-{key}.journal", {"cache_key": key, "batch": data.batch_size}
            )
            result = run_suite(suite, engine, variant, data, advance, journal)
            seconds = time.perf_counter() - start
            figures = {
                **result.figures,
                **ident,
                "seconds": round(seconds, 1),
                "examples_per_s": round(len(result.rows) / seconds, 3),
                "predictions": f"cache/{suite}-{key}.jsonl",
            }
            write_jsonl_atomic(cache / f"{suite}-{key}.jsonl", result.rows)
            write_json_atomic(stored, figures)
            journal.path.unlink()
            results[variant.label][suite] = figures
            log(f"{variant.label}: {suite} done in {seconds:.0f} s")
    return results
