"""`afm eval summarize|quality`: task quality of a feature; closeness to a reference model."""

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
from openafm.cli.common import (
    KernelOption,
    choose_kernel,
    command_line,
    err_console,
    load_named,
    print_json,
    user_errors,
)
from openafm.eval import rouge_report
from openafm.features import feature_for, get_feature, summarize
from openafm.files import read_jsonl, sha256_file, write_json_atomic
from openafm.runtime import engine_for

app = typer.Typer(
    help="Measure quality: summarization ROUGE; closeness to a reference model.",
    no_args_is_help=True,
)


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
    kernel: KernelOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Summarize each record greedily and report ROUGE-1/2/L with 95% bootstrap intervals."""
    choose_kernel(kernel)
    with user_errors():
        records = _read_records(data, limit)
        task = get_feature(feature) if feature else feature_for(records)
        references = [task.references(r) for r in records]
        with err_console.status("loading model…", spinner="dots"):
            pretrained = load_named(model)
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


@app.command("quality")
def quality_cmd(
    model: Annotated[str, typer.Option(help="Model to score (e.g. a compressed directory).")],
    data: Annotated[Path, typer.Option(help="Plain text to score on (never calibration text).")],
    reference: Annotated[
        str | None, typer.Option(help="Reference model [default: the on-device base].")
    ] = None,
    tokens: Annotated[
        int, typer.Option(min=2, help="Token budget: the first N tokens of --data, in windows.")
    ] = 4096,
    window: Annotated[
        int, typer.Option(min=2, help="Window length; each window's second half is scored.")
    ] = 512,
    recovery: Annotated[
        bool, typer.Option(help="Keep a compressed model's recovery adapter attached.")
    ] = True,
    kv_int8: Annotated[
        bool, typer.Option(help="Read keys and values from an int8 KV cache.")
    ] = False,
    act_int8: Annotated[
        bool, typer.Option(help="Round every projection's input to int8 per token.")
    ] = False,
    kernel: KernelOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Score MODEL against REFERENCE as llama.cpp's perplexity tool does: both perplexities and
    their ratio, per-token KL divergence (mean, 99th percentile), same-top-1 rate, and MODEL's
    bits per weight (projections: `bpw`; every weight, embedding included: `bpw_total`)."""
    import contextlib

    from openafm.adapters import detach
    from openafm.compress.activations import int8_activations
    from openafm.compress.calibration import text_windows
    from openafm.eval.quality import compare_models
    from openafm.io.compressed_checkpoint import bits_summary

    choose_kernel(kernel)
    with user_errors():
        with err_console.status("loading models…", spinner="dots"):
            scored = load_named(model)
            base = load_named(reference)
        if not recovery:
            detach(scored.model)
        windows = text_windows(scored.tokenizer, data, window=window, max_tokens=tokens)
        quantized = int8_activations(scored.model) if act_int8 else contextlib.nullcontext()
        with Progress(console=err_console, transient=True) as progress, quantized:
            bar = progress.add_task("scoring", total=len(windows))
            report = compare_models(
                scored.model,
                base.model,
                windows,
                kv_dtype=torch.int8 if kv_int8 else None,
                on_window=lambda i: progress.update(bar, completed=i),
            )
        summary = bits_summary(scored.model)
        result = {
            "model": model,
            "reference": reference or "smollm2-135m-instruct",
            "data": data.name,
            **report.as_dict(),
            "bpw": summary["bpw"],
            "bpw_total": summary["bpw_total"],
            "recovery_adapter": recovery and scored.default_adapter is not None,
            "kv_int8": kv_int8,
            "act_int8": act_int8,
        }
        if json_output:
            print_json(result)
            return
        print(
            f"ppl {report.ppl:.3f} vs {report.ppl_reference:.3f} (ratio {report.ppl_ratio:.4f});"
            f" KLD mean {report.kld_mean:.4f}, p99 {report.kld_p99:.4f};"
            f" same top-1 {100 * report.top1_agreement:.1f}%; {report.tokens} tokens scored;"
            f" bpw {summary['bpw']:.3f}, bpw_total {summary['bpw_total']:.3f}"
        )
