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
from collections.abc import Callable
from pathlib import Path

import multiprocess
from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
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
from datatrove.pipeline.tokens import TokensCounter
from datatrove.pipeline.writers import JsonlWriter

from openafm.data.config import CurateConfig
from openafm.data.decontaminate import Decontaminate, EvalNgramCounter, build_eval_index
from openafm.data.quality import QualityScore
from openafm.data.readers import WebReader, input_files
from openafm.data.report import write_report
from openafm.data.stages import ExtractMainText, Intake, LanguageId, OptOut, Pii, Profanity

TASK_BYTES = 64 * 1024 * 1024
TEXT_CHANGING_STAGES = ("extract", "c4", "pii")  # token counts are refreshed after these
# Local workers start from a fork server that has already imported the stages' libraries:
# without the preload every worker of every phase re-imported datatrove, spaCy and fastText
# (2 workers ran 2x slower than 1), and plain fork deadlocked under the CLI's progress thread.
START_METHOD = "forkserver"
PRELOAD = ["openafm.data.stages", "openafm.data.decontaminate", "openafm.data.quality", "spacy"]


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
    if name == "quality_model":
        return QualityScore(config.quality_model, config.quality_threshold, exclusion_writer=excl)
    raise ValueError(f"unknown stage {name}")


def curate(
    inputs: list[str],
    out: Path | str,
    config: CurateConfig = CurateConfig(),
    *,
    robots_dir: str | None = None,
    workers: int = 1,
    executor: str = "local",
    tasks: int | None = None,
) -> dict:
    """Run the pipeline; return the stats written to `out/stats.json`.

    `executor="ray"` runs every task on the Ray cluster `ray.init()` connected to (a local one
    is started if none is); the output folder must then be on storage all workers share.
    `tasks` is how many pieces the input is cut into (default: one per 64 MB of input, at least
    four per worker, at most one per file); a rerun skips the pieces already done.
    """
    out = Path(out).resolve()
    files = input_files(inputs)
    stages = config.document_stages
    skipped = {"optout": robots_dir is None, "quality_model": not config.quality_model}
    stages = tuple(s for s in stages if not skipped.get(s))
    corpus = [s for s in config.corpus_stages if s != "decontaminate" or config.eval_sets]
    removed, work, logs = out / "removed", out / "work", out / "logs"
    if tasks is None:
        size = sum(Path(f).stat().st_size for f in files)
        tasks = max(4 * workers, size // TASK_BYTES)
    tasks = max(1, min(tasks, len(files)))
    make = _executor_factory(executor, workers, logs)

    filtered = work / "filtered" if corpus else out / "kept"
    steps = [WebReader(files), Intake(exclusion_writer=JsonlWriter(str(removed / "intake")))]
    labels: list[str | None] = ["read", "intake"]
    for stage in stages:
        steps.append(_document_stage(stage, config, removed, robots_dir))
        labels.append(stage)
        if config.tokenizer_file and stage in TEXT_CHANGING_STAGES:
            steps.append(TokensCounter(config.tokenizer_file))
            labels.append(None)
    steps.append(JsonlWriter(str(filtered)))
    phases = [("documents", make("documents", steps, tasks), [*labels, None])]

    current = filtered
    for stage in corpus:
        target = out / "kept" if stage == corpus[-1] else work / f"{stage}_kept"
        excl = JsonlWriter(str(removed / stage))
        before, last = _corpus_stage(stage, config, str(current), work, excl, make, tasks)
        steps = [_work_reader(str(current)), last, JsonlWriter(str(target))]
        phases += [*before, (stage, make(stage, steps, tasks), [None, stage, None])]
        current = target

    previous = None
    for _, runner, _ in phases:
        runner.depends = previous
        previous = runner
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no stage may reach the network
    previous.run()
    extra = {"minhash": config.minhash_s_curve()} if "fuzzy_dedup" in corpus else {}
    return write_report(out, [(name, labels) for name, _, labels in phases], extra)


def _work_reader(folder: str) -> JsonlReader:
    """Reads an intermediate folder without stamping the run's scratch path on each document."""
    return JsonlReader(folder, add_file_path=False)


def _corpus_stage(
    stage: str,
    config: CurateConfig,
    source: str,
    work: Path,
    excl: JsonlWriter,
    make: Callable[[str, list, int], PipelineExecutor],
    tasks: int,
) -> tuple[list[tuple[str, PipelineExecutor, list]], PipelineStep]:
    """The phases a whole-corpus stage needs before its filter, and that filter."""
    if stage == "exact_dedup":
        exact = ExactDedupConfig(content_getter=normalised_text)
        sigs, dups = str(work / "exact_sigs"), str(work / "exact_dups")
        before = [
            ("exact_signatures", [_work_reader(source), ExactDedupSignature(sigs, exact)], tasks),
            ("exact_find", [ExactFindDedups(sigs, dups, exact)], 1),
        ]
        last = ExactDedupFilter(dups, exact, exclusion_writer=excl)
    elif stage == "fuzzy_dedup":
        minhash = MinhashConfig(
            n_grams=config.minhash_ngrams,
            num_buckets=config.minhash_bands,
            hashes_per_bucket=config.minhash_rows,
            seed=config.seed,
        )
        sigs, buckets, clusters = (
            str(work / f"minhash_{x}") for x in ("sigs", "buckets", "clusters")
        )
        before = [
            (
                "fuzzy_signatures",
                [_work_reader(source), MinhashDedupSignature(sigs, config=minhash)],
                tasks,
            ),
            (
                "fuzzy_buckets",
                [MinhashDedupBuckets(sigs, buckets, config=minhash)],
                minhash.num_buckets,
            ),
            ("fuzzy_cluster", [MinhashDedupCluster(buckets, clusters, config=minhash)], 1),
        ]
        last = MinhashDedupFilter(clusters, exclusion_writer=excl)
    else:
        index, counts = work / "decontam" / "eval_ngrams.npy", str(work / "decontam" / "counts")
        n, max_docs = config.decontam_ngram, config.decontam_max_docs
        build_eval_index(list(config.eval_sets), n, index)
        before = [
            (
                "decontam_count",
                [_work_reader(source), EvalNgramCounter(str(index), counts, n)],
                tasks,
            )
        ]
        last = Decontaminate(str(index), counts, n, max_docs, exclusion_writer=excl)
    return [(name, make(name, steps, n_tasks), []) for name, steps, n_tasks in before], last


def _executor_factory(
    kind: str, workers: int, logs: Path
) -> Callable[[str, list, int], PipelineExecutor]:
    """`make(name, steps, tasks)` → a datatrove executor of the chosen kind."""
    if kind == "local":
        multiprocess.get_context(START_METHOD).set_forkserver_preload(PRELOAD)
        return lambda name, steps, tasks: LocalPipelineExecutor(
            steps,
            tasks=tasks,
            workers=workers,
            logging_dir=str(logs / name),
            start_method=START_METHOD,
        )
    if kind == "ray":
        import ray
        from datatrove.executor.ray import RayPipelineExecutor

        if not ray.is_initialized():
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        return lambda name, steps, tasks: RayPipelineExecutor(
            steps, tasks=tasks, workers=workers, logging_dir=str(logs / name), mem_per_cpu_gb=0.5
        )
    raise ValueError(f"unknown executor {kind!r}: use 'local' or 'ray'")
