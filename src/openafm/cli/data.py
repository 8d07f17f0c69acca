"""`afm data curate|stats`: the web-data curation pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from openafm.cli.common import err_console, print_json, user_errors
from openafm.cli.task_progress import logs_to_file_with_progress

app = typer.Typer(help="Curate web data into clean, deduplicated documents.", no_args_is_help=True)


@app.command()
def curate(
    inputs: Annotated[
        list[str],
        typer.Option(
            "--input", "-i", help="WARC/ARC, HTML or JSONL file, or a folder of them (repeatable)."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Output folder (kept/, removed/, stats.json, report.md).")
    ],
    config_file: Annotated[
        Path | None, typer.Option("--config", help="TOML file overriding CurateConfig fields.")
    ] = None,
    robots: Annotated[
        str | None,
        typer.Option(
            help="robots.txt snapshots: DIR/DATE/HOST/robots.txt (enables the optout stage)."
        ),
    ] = None,
    only: Annotated[
        str | None, typer.Option(help="Comma-separated stages to run, in this order (e.g. 'pii').")
    ] = None,
    quality_model: Annotated[
        Path | None,
        typer.Option(help="Quality model (.npz from afm data train-quality); enables that stage."),
    ] = None,
    eval_sets: Annotated[
        list[str] | None,
        typer.Option(
            "--eval-set",
            help="Evaluation file (JSONL/JSON/CSV/TXT) to decontaminate against (repeatable).",
        ),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            help="local (processes here) or ray (the cluster ray.init() finds, else a local one)."
        ),
    ] = "local",
    workers: Annotated[int, typer.Option(min=1, help="Parallel worker processes.")] = 1,
    tasks: Annotated[
        int | None,
        typer.Option(
            min=1, help="Pieces to cut the input into (default: 64 MB each, >= 4 per worker)."
        ),
    ] = None,
    count_tokens: Annotated[
        bool, typer.Option(help="Count tokens per stage with the default model's tokenizer.")
    ] = True,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show datatrove's logs.")
    ] = False,
) -> None:
    """Read, opt-out, extract, filter, mask PII and deduplicate; a rerun resumes where it stopped."""
    with user_errors():
        from openafm.data import CurateConfig, CurationError
        from openafm.data import curate as run_curate
        from openafm.data.readers import input_files

        config = CurateConfig.from_file(config_file) if config_file else CurateConfig()
        if quality_model:
            config = dataclasses.replace(config, quality_model=str(quality_model))
        if eval_sets:
            config = dataclasses.replace(config, eval_sets=tuple(eval_sets))
        if only:
            config = dataclasses.replace(config, stages=tuple(s.strip() for s in only.split(",")))
        input_files(inputs)  # a missing input is reported before any work starts
        if count_tokens:
            from openafm.runtime import load_tokenizer_for

            load_tokenizer_for().save(out / "work" / "tokenizer")
            tokenizer_file = str((out / "work" / "tokenizer" / "tokenizer.json").resolve())
            config = dataclasses.replace(config, tokenizer_file=tokenizer_file)
        try:
            with contextlib.nullcontext() if verbose else logs_to_file_with_progress(out / "logs"):
                stats = run_curate(
                    inputs,
                    out,
                    config,
                    robots_dir=robots,
                    workers=workers,
                    executor=executor,
                    tasks=tasks,
                )
        except CurationError as exc:
            raise ValueError(str(exc)) from None
        err_console.print(
            f"{stats['documents_in']} documents read, {stats['documents_kept']} kept → {out}/kept"
            f" (report: {out}/report.md, logs: {out}/logs/curate.log)",
            highlight=False,
        )


@app.command()
def stats(
    out: Annotated[Path, typer.Argument(help="Output folder of `afm data curate`.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print stats.json.")] = False,
) -> None:
    """Per stage: documents in, out, and removed by reason."""
    with user_errors():
        from openafm.data import read_stats, render_markdown

        report = read_stats(out)
        if json_output:
            print_json(report)
        else:
            print(render_markdown(report), end="")


@app.command()
def shards(
    documents: Annotated[
        Path,
        typer.Argument(help="Output folder of `afm data curate` (its kept/), or a JSONL folder."),
    ],
    out: Annotated[Path, typer.Option(help="Folder for shard-*.bin and manifest.json.")],
    model: Annotated[
        str | None, typer.Option(help="Model whose tokenizer to use (default: the default base).")
    ] = None,
    shard_tokens: Annotated[int, typer.Option(min=1, help="Tokens per shard file.")] = 1 << 24,
    json_output: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
) -> None:
    """Tokenize curated documents and pack them into token shards for pre-training."""
    with user_errors():
        from openafm.data.shards import write_shards
        from openafm.io import DEFAULT_MODEL
        from openafm.runtime import load_tokenizer_for

        source = documents / "kept" if (documents / "kept").is_dir() else documents
        tokenizer = load_tokenizer_for(model)
        with err_console.status("tokenizing…", spinner="dots"):
            manifest = write_shards(
                source,
                out,
                tokenizer,
                tokenizer_name=model or DEFAULT_MODEL,
                shard_tokens=shard_tokens,
            )
        if json_output:
            print_json(manifest)
        else:
            err_console.print(
                f"{manifest['documents']} documents, {manifest['tokens']} tokens in"
                f" {len(manifest['shards'])} shard(s) → {out}",
                highlight=False,
            )


@app.command("train-quality")
def train_quality(
    positive: Annotated[
        Path, typer.Option(help="Reference-quality texts: JSONL (text field) or plain text.")
    ],
    negative: Annotated[
        Path, typer.Option(help="Raw web texts: JSONL (text field) or plain text.")
    ],
    out: Annotated[Path, typer.Option(help="Model file to write (metrics go beside it as .json).")],
    test_fraction: Annotated[float, typer.Option(min=0.05, max=0.5, help="Held-out share.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Split and training seed.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Train the quality classifier (hashed n-gram logistic regression) and report held-out accuracy and ROC AUC."""
    with user_errors():
        from openafm.data.quality import read_texts, train_quality_model

        pos, neg = read_texts(positive), read_texts(negative)
        with err_console.status(f"training on {len(pos)} + {len(neg)} texts…", spinner="dots"):
            metrics = train_quality_model(pos, neg, out, test_fraction=test_fraction, seed=seed)
        if json_output:
            print_json(metrics)
        else:
            print(
                f"held-out accuracy {metrics['accuracy']:.3f}, ROC AUC {metrics['roc_auc']:.3f}"
                f" on {metrics['test_examples']} texts → {out}"
            )
