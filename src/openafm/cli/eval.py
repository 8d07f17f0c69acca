"""`afm eval summarize`: task quality of a summarization feature, base or with an adapter."""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import Progress

from openafm.adapters.adapter_file import record_evaluation
from openafm.adapters.registry import find_adapter
from openafm.cli.common import command_line, err_console, print_json, user_errors
from openafm.eval import rouge_report
from openafm.features import feature_for, get_feature, summarize
from openafm.files import read_jsonl, sha256_file, write_json_atomic
from openafm.runtime import engine_for, load_pretrained

app = typer.Typer(help="Measure quality: summarization ROUGE.", no_args_is_help=True)


def _read_records(path: Path, limit: int | None) -> list[dict[str, object]]:
    records = [record for _, record in islice(read_jsonl(path), limit)]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


@app.command("summarize")
def summarize_cmd(
    data: Annotated[
        Path,
        typer.Option(
            help="JSONL records: AESLC (email, ann0-2) or DialogSum (dialogue, summary*)."
        ),
    ],
    adapter: Annotated[
        str | None, typer.Option(help="Adapter to apply [default: none, the prompted base].")
    ] = None,
    feature: Annotated[
        str | None,
        typer.Option(help="Feature (prompt format) [default: from the records' fields]."),
    ] = None,
    shots: Annotated[
        int, typer.Option(min=0, help="Demonstrations before each record (few-shot prompt).")
    ] = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Score only the first N records.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together.")] = 8,
    model: Annotated[
        str | None, typer.Option(help="Base model [default: the on-device base].")
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Also write each summary and its references to this JSON file."),
    ] = None,
    record: Annotated[
        str | None,
        typer.Option(
            help="Store the result in this adapter's adapter.json (as 'adapter' when it is the"
            " adapter evaluated, else as 'prompted_base')."
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarize each record greedily and report ROUGE-1/2/L with 95% bootstrap intervals."""
    with user_errors():
        records = _read_records(data, limit)
        task = get_feature(feature) if feature else feature_for(records)
        references = [task.references(r) for r in records]
        with err_console.status("loading model…", spinner="dots"):
            pretrained = load_pretrained(model)
        engine = engine_for(pretrained, prefill_dtype=torch.bfloat16)
        start = time.perf_counter()
        with Progress(console=err_console, transient=True) as progress:
            bar = progress.add_task(f"{task.name} ({adapter or 'base'})", total=len(records))
            summaries = summarize(
                engine,
                task,
                records,
                adapter=adapter,
                shots=shots,
                batch_size=batch_size,
                on_batch=lambda n: progress.advance(bar, n),
            )
        report = {
            "feature": task.name,
            "adapter": adapter,
            "shots": shots,
            **rouge_report(summaries, references),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if predictions is not None:
            write_json_atomic(
                predictions,
                [
                    {"summary": s, "references": r}
                    for s, r in zip(summaries, references, strict=True)
                ],
            )
        if record is not None:
            target = find_adapter(record)
            role = (
                "adapter"
                if adapter is not None and find_adapter(adapter) == target
                else "prompted_base"
            )
            provenance = {"data_sha256": sha256_file(data), "command": command_line()}
            record_evaluation(target, data.name, role, {**report, **provenance})
        if json_output:
            print_json(report)
            return
        for key in ("rouge1", "rouge2", "rougeL"):
            low, high = report[f"{key}_ci"]  # type: ignore[misc]
            print(f"{key:7} {report[key]:.4f}  (95% CI {low:.4f}-{high:.4f})")
        print(f"n {report['n']}, mean summary length {report['mean_words']} words")
