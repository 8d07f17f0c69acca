"""`curate`: web data in, clean deduplicated documents out, every removal recorded.

Output folder:
    kept/            the documents that survived, JSONL (gzip)
    removed/STAGE/   the documents each stage removed, with `metadata.filter_reason`
    stats.json       per stage: in, out, removed by reason (see `openafm.data.report`)
    report.md        the same, for people
    work/, logs/     intermediate files and datatrove's task logs (a rerun skips finished tasks)
"""

from __future__ import annotations

import os
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from openafm.data.config import CurateConfig
from openafm.data.readers import WebReader, input_files
from openafm.data.report import write_report
from openafm.data.stages import ExtractMainText, Intake, LanguageId, OptOut, Pii, Profanity


def normalised_text(doc) -> str:
    """What exact dedup compares: lower-cased text with whitespace collapsed."""
    return " ".join(doc.text.lower().split())


def _document_stage(name: str, config: CurateConfig, removed: Path, robots_dir: str | None):
    excl = JsonlWriter(str(removed / name))
    if name == "optout":
        if robots_dir is None:
            raise ValueError("the optout stage needs robots snapshots: pass --robots DIR")
        return OptOut(
            robots_dir, config.crawler_token, config.training_token, exclusion_writer=excl
        )
    if name == "extract":
        return ExtractMainText(exclusion_writer=excl)
    if name == "language":
        return LanguageId(config.languages, config.language_threshold, exclusion_writer=excl)
    if name == "gopher_repetition":
        return GopherRepetitionFilter(exclusion_writer=excl)
    if name == "gopher_quality":
        return GopherQualityFilter(exclusion_writer=excl)
    if name == "c4":
        return C4QualityFilter(exclusion_writer=excl)
    if name == "fineweb":
        return FineWebQualityFilter(exclusion_writer=excl)
    if name == "profanity":
        return Profanity(config.profanity_max_ratio, exclusion_writer=excl)
    if name == "pii":
        return Pii(config.pii_max_hits, exclusion_writer=excl)
    raise ValueError(f"unknown stage {name}")


def curate(
    inputs: list[str],
    out: Path | str,
    config: CurateConfig = CurateConfig(),
    *,
    robots_dir: str | None = None,
    workers: int = 1,
) -> dict:
    """Run the pipeline; return the stats written to `out/stats.json`."""
    out = Path(out).resolve()
    files = input_files(inputs)
    stages = config.document_stages
    if "optout" in stages and robots_dir is None:
        stages = tuple(s for s in stages if s != "optout")
    removed, work, logs = out / "removed", out / "work", out / "logs"
    corpus = config.corpus_stages
    filtered = work / "filtered" if corpus else out / "kept"
    tasks = len(files)

    steps = [WebReader(files), Intake(exclusion_writer=JsonlWriter(str(removed / "intake")))]
    steps += [_document_stage(s, config, removed, robots_dir) for s in stages]
    steps.append(JsonlWriter(str(filtered)))
    labels = ["read", "intake", *stages, None]
    phases = [
        (
            "documents",
            LocalPipelineExecutor(
                steps, tasks=tasks, workers=workers, logging_dir=str(logs / "documents")
            ),
            labels,
        )
    ]

    current = filtered
    if "exact_dedup" in corpus:
        exact = ExactDedupConfig(content_getter=normalised_text)
        target = work / "exact_kept" if "fuzzy_dedup" in corpus else out / "kept"
        phases += _exact_dedup_phases(current, target, work, removed, logs, exact, tasks, workers)
        current = target
    if "fuzzy_dedup" in corpus:
        minhash = MinhashConfig(
            n_grams=config.minhash_ngrams,
            num_buckets=config.minhash_bands,
            hashes_per_bucket=config.minhash_rows,
            seed=config.seed,
        )
        phases += _minhash_phases(
            current, out / "kept", work, removed, logs, minhash, tasks, workers
        )

    previous = None
    for _, executor, _ in phases:
        executor.depends = previous
        previous = executor
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no stage may reach the network
    previous.run()
    return write_report(out, [(name, labels) for name, _, labels in phases])


def _exact_dedup_phases(source, target, work, removed, logs, config, tasks, workers):
    sigs, dups = work / "exact_sigs", work / "exact_dups"
    return [
        ("exact_signatures", LocalPipelineExecutor(
            [JsonlReader(str(source)), ExactDedupSignature(str(sigs), config)],
            tasks=tasks, workers=workers, logging_dir=str(logs / "exact_signatures"),
        ), []),
        ("exact_find", LocalPipelineExecutor(
            [ExactFindDedups(str(sigs), str(dups), config)],
            tasks=1, workers=1, logging_dir=str(logs / "exact_find"),
        ), []),
        ("exact_dedup", LocalPipelineExecutor(
            [
                JsonlReader(str(source)),
                ExactDedupFilter(str(dups), config, exclusion_writer=JsonlWriter(str(removed / "exact_dedup"))),
                JsonlWriter(str(target)),
            ],
            tasks=tasks, workers=workers, logging_dir=str(logs / "exact_dedup"),
        ), [None, "exact_dedup", None]),
    ]  # fmt: skip


def _minhash_phases(source, target, work, removed, logs, config, tasks, workers):
    sigs, buckets, clusters = (
        work / "minhash_sigs",
        work / "minhash_buckets",
        work / "minhash_clusters",
    )
    return [
        ("fuzzy_signatures", LocalPipelineExecutor(
            [JsonlReader(str(source)), MinhashDedupSignature(str(sigs), config=config)],
            tasks=tasks, workers=workers, logging_dir=str(logs / "fuzzy_signatures"),
        ), []),
        ("fuzzy_buckets", LocalPipelineExecutor(
            [MinhashDedupBuckets(str(sigs), str(buckets), config=config)],
            tasks=config.num_buckets, workers=workers, logging_dir=str(logs / "fuzzy_buckets"),
        ), []),
        ("fuzzy_cluster", LocalPipelineExecutor(
            [MinhashDedupCluster(str(buckets), str(clusters), config=config)],
            tasks=1, workers=1, logging_dir=str(logs / "fuzzy_cluster"),
        ), []),
        ("fuzzy_dedup", LocalPipelineExecutor(
            [
                JsonlReader(str(source)),
                MinhashDedupFilter(str(clusters), exclusion_writer=JsonlWriter(str(removed / "fuzzy_dedup"))),
                JsonlWriter(str(target)),
            ],
            tasks=tasks, workers=workers, logging_dir=str(logs / "fuzzy_dedup"),
        ), [None, "fuzzy_dedup", None]),
    ]  # fmt: skip
