"""`afm eval summarize|quality`: feature quality (ROUGE, graded summaries), closeness to a
reference model; the suites (`ifeval`, `safety`, `injection`, `report`) live in `eval_suites`."""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import Progress

from openafm.cli import eval_suites
from openafm.cli.common import (
    KernelOption,
    choose_kernel,
    err_console,
    load_named,
    print_json,
    progress_bar,
    user_errors,
)
from openafm.cli.eval_suites import (
    load_engine,
    provenance_of,
    record_in_adapter,
    record_target,
    run_record,
)
from openafm.eval.suites import score_summaries
from openafm.features import feature_for, get_feature
from openafm.features.summarize import replies
from openafm.files import read_records, write_jsonl_atomic

app = typer.Typer(
    help="Measure quality: summaries (ROUGE, grades); closeness to a reference model;"
    " instruction following (IFEval); safety (AdvBench, HarmBench, XSTest); prompt injection;"
    " one report for every model variant.",
    no_args_is_help=True,
)


def _read_records(path: Path, limit: int | None) -> list[dict[str, object]]:
    records = [record for _, record in islice(read_records(path), limit)]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


@app.command("summarize")
def summarize_cmd(
    data: Annotated[
        Path,
        typer.Option(
            help="Records: AESLC (JSONL: email, ann0-2), DialogSum (JSONL: dialogue,"
            " summary*) or SAMSum (CSV: id, summary, dialogue)."
        ),
    ],
    adapter: Annotated[
        str | None, typer.Option(help="Adapter to apply (default: none, the prompted base).")
    ] = None,
    feature: Annotated[
        str | None,
        typer.Option(help="Feature (prompt format) (default: from the records' fields)."),
    ] = None,
    shots: Annotated[
        int, typer.Option(min=0, help="Demonstrations before each record (few-shot prompt).")
    ] = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Score only the first N records.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together.")] = 8,
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the on-device base).")
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(
            help="Write one JSON line per record here: prompt, response (the summary),"
            " references, ROUGE-L and grades."
        ),
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
    """Summarize each record greedily; report ROUGE-1/2/L and graded summaries (good, neutral,
    poor on the seed's scheme, with automatic proxies; per input-length tercile), each with a
    95% bootstrap interval."""
    choose_kernel(kernel)
    with user_errors():
        records = _read_records(data, limit)
        task = get_feature(feature) if feature else feature_for(records)
        target = record_target(record)
        for r in records:  # bad records fail before the model loads
            task.input_of(r)
            task.references(r)
        engine, signature = load_engine(model)
        start = time.perf_counter()
        with progress_bar(f"{task.name} ({adapter or 'base'})", len(records)) as advance:
            texts = replies(
                engine,
                task,
                records,
                adapter=adapter,
                shots=shots,
                batch_size=batch_size,
                on_batch=advance,
            )
        decoding = {"temperature": 0.0, "max_tokens": task.max_tokens, "shots": shots}
        run = run_record(model, signature, decoding, start, len(records))
        result = score_summaries(task, records, texts)
        report = {**result.figures, "adapter": adapter, "shots": shots}
        report |= provenance_of(data, adapter, run)
        if predictions is not None:
            write_jsonl_atomic(predictions, result.rows)
        record_in_adapter(target, adapter, data, report, base_role="prompted_base")
        if json_output:
            print_json(report)
            return
        for key in ("rouge1", "rouge2", "rougeL"):
            low, high = report[f"{key}_ci"]  # type: ignore[misc]
            print(f"{key:7} {report[key]:.4f}  (95% CI {low:.4f}-{high:.4f})")
        for name, part in report["grades"].items():  # type: ignore[union-attr]
            low, high = part["ci"]
            print(f"{name:7} {100 * part['rate']:5.1f}%  (95% CI {100 * low:.1f}-{100 * high:.1f})")
        print(f"n {report['n']}, mean summary length {report['mean_words']} words")


@app.command("quality")
def quality_cmd(
    model: Annotated[str, typer.Option(help="Model to score (e.g. a compressed directory).")],
    data: Annotated[Path, typer.Option(help="Plain text to score on (never calibration text).")],
    reference: Annotated[
        str | None, typer.Option(help="Reference model (default: the on-device base).")
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


app.command("ifeval")(eval_suites.ifeval_cmd)
app.command("safety")(eval_suites.safety_cmd)
app.command("injection")(eval_suites.injection_cmd)
app.command("report")(eval_suites.report_cmd)


@app.command("compare")
def compare_cmd(
    before: Annotated[
        Path, typer.Argument(help="Per-example rows of the baseline (--predictions).")
    ],
    after: Annotated[Path, typer.Argument(help="Per-example rows of the variant to compare.")],
    metric: Annotated[
        str,
        typer.Option(
            help="prompt_strict, prompt_loose, instruction_strict, instruction_loose (IFEval);"
            " refusal, over_refusal (safe prompts) or violation (harmful prompts) (safety)."
        ),
    ] = "prompt_strict",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Paired comparison on the prompts both files hold: the difference with a prompt-clustered
    95% bootstrap interval, McNemar's exact test and the smallest detectable difference."""
    from openafm.eval.paired import compare

    with user_errors():
        result = compare(_read_records(before, None), _read_records(after, None), metric)
        if json_output:
            print_json(result)
            return
        low, high = result["difference_ci"]  # type: ignore[misc]
        line = (
            f"{metric}: {100 * result['before']:.1f}% → {100 * result['after']:.1f}%"  # type: ignore[operator]
            f" ({100 * result['difference']:+.1f} points, 95% CI {100 * low:+.1f} to {100 * high:+.1f};"  # type: ignore[operator]
            f" {result['prompts']} prompts)"
        )
        if "mcnemar" in result:
            test = result["mcnemar"]
            line += (
                f"; McNemar p = {test['p_value']:.3g} ({test['gained']} gained, {test['lost']} lost),"  # type: ignore[index]
                f" smallest detectable ±{100 * result['smallest_detectable_difference']:.1f} points"  # type: ignore[operator]
            )
        print(line)
