"""`afm compress` and `afm recover`: palettize a model, then train its accuracy-recovery adapter."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from openafm.adapters import save_adapter
from openafm.adapters.trainer import TrainConfig
from openafm.cli.common import (
    command_line,
    err_console,
    load_named,
    print_json,
    resolve_device,
    training_progress,
    user_errors,
)
from openafm.compress.allocate import OperationCost, allocate_bits, allocation_report
from openafm.compress.palettize import PalettizeConfig
from openafm.compress.pipeline import DEFAULT_CALIBRATION, CompressConfig, compress_model
from openafm.compress.recovery import RecoveryConfig, run_recovery
from openafm.files import sha256_file, write_json_atomic
from openafm.io.compressed_checkpoint import (
    RECOVERY_DIR,
    bits_summary,
    read_compression_meta,
    save_compressed,
)

ALLOCATION_FILE = "allocation.json"


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise typer.BadParameter("use a list like 2,3,4", param_hint="--bits") from None


def _stage_progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return progress, report


def _print_report(rows: list[dict], summary: dict) -> None:
    table = Table(title="bits per projection", show_lines=False)
    for column in ("projection", "bits", "bytes", "sensitivity (KLD)", "latency share"):
        table.add_column(column, justify="left" if column == "projection" else "right")
    for row in rows:
        table.add_row(
            row["name"],
            str(row["bits"]),
            "-" if row["bytes"] is None else f"{row['bytes']:,}",
            "-" if row["sensitivity"] is None else f"{row['sensitivity']:.5f}",
            "-" if row["latency_share"] is None else f"{100 * row['latency_share']:.2f}%",
        )
    Console().print(table)
    print(
        f"bpw {summary['bpw']:.3f} (palettized projections, tables and scales included);"
        f" bpw_total {summary['bpw_total']:.3f} (every weight, 8-bit embedding included);"
        f" {summary['bytes'] / 2**20:.1f} MiB"
    )


def _read_costs(path: Path) -> list[OperationCost]:
    try:
        saved = json.loads(path.read_text())["candidates"]
        return [OperationCost(**c) for c in saved]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not an allocation report with candidates ({exc})") from None


def compress(
    out: Annotated[Path, typer.Option(help="Directory to write the compressed model to.")],
    model: Annotated[
        str | None, typer.Option(help="Model to compress (default: the on-device base).")
    ] = None,
    bpw: Annotated[
        float,
        typer.Option(help="Target average bits per weight of the projections (tables included)."),
    ] = 4.0,
    bits: Annotated[
        str, typer.Option(help="Allowed widths, e.g. 2,4 (the seed's) or 2,3,4,6.")
    ] = "2,3,4,6",
    group: Annotated[int, typer.Option(min=1, help="Output rows sharing one lookup table.")] = 16,
    calibration: Annotated[
        Path | None,
        typer.Option(help="Calibration text (default: a bundled WikiText-2 validation slice)."),
    ] = None,
    calibration_tokens: Annotated[
        int, typer.Option(min=64, help="Tokens to calibrate on.")
    ] = 16384,
    row_scale: Annotated[bool, typer.Option(help="Scale each row before sharing tables.")] = True,
    error_feedback: Annotated[
        bool, typer.Option(help="GPTQ rounding (errors fed to later columns).")
    ] = True,
    weighted: Annotated[bool, typer.Option(help="Activation-weighted k-means.")] = True,
    costs: Annotated[
        Path | None,
        typer.Option(
            help="Reuse the measured candidates of an earlier run's allocation.json (same model,"
            " calibration and widths) instead of measuring again."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Palettize every projection (2^bits-entry tables shared by --group rows), choosing bits
    per projection from measured sensitivity to meet --bpw; the embedding becomes 8-bit.

    Prints and saves (allocation.json) the per-projection report: bits, bytes, sensitivity
    (KLD rise on calibration text with only that projection at those bits) and its share of
    one-token latency. Compare models with `afm eval quality`.
    """
    with user_errors():
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
        widths = _widths(bits)
        config = CompressConfig(
            target_bpw=bpw,
            bit_widths=widths,
            palettize=PalettizeConfig(
                group_size=group,
                row_scale=row_scale,
                error_feedback=error_feedback,
                weighted=weighted,
            ),
            calibration_tokens=calibration_tokens,
        )
        calibration = calibration or DEFAULT_CALIBRATION
        with err_console.status("loading model…", spinner="dots"):
            pretrained = load_named(model)
            base_signature = pretrained.signature()  # before compressing it in place
        plan = None
        reused: list[OperationCost] = []
        if costs is not None:
            reused = [c for c in _read_costs(costs) if c.bits in widths]
            plan = allocate_bits(reused, bpw)
        progress, report = _stage_progress()
        start = time.perf_counter()
        with progress:
            result = compress_model(
                pretrained.model,
                pretrained.tokenizer,
                calibration,
                config,
                bits_plan=plan,
                progress=report,
            )
        measured = result.costs or reused
        rows = allocation_report(result.bits, measured)
        made_with = {
            "base": str(model or "smollm2-135m-instruct"),
            "base_signature": base_signature,
            "calibration": calibration.name,
            "calibration_sha256": sha256_file(calibration),
            "config": config.to_dict(),
            "command": command_line(),
            "seconds": round(time.perf_counter() - start, 1),
        }

        def extras(directory: Path) -> None:
            pretrained.tokenizer.save(directory)
            write_json_atomic(
                directory / ALLOCATION_FILE,
                {"projections": rows, "candidates": [asdict(c) for c in measured]},
            )

        save_compressed(
            result.model, out, made_with=made_with, write_extra=extras, overwrite=overwrite
        )
        summary = bits_summary(result.model)
        if json_output:
            print_json({"out": str(out), **summary, "projections": rows})
            return
        _print_report(rows, summary)
        print(f"wrote {out}")


def recover(
    model: Annotated[Path, typer.Option(help="Compressed model directory (from afm compress).")],
    data: Annotated[
        list[Path],
        typer.Option(
            help="Training text: .txt files, or JSON/JSONL records (text, messages, or"
            " instruction/output). Repeat for several files."
        ),
    ],
    teacher: Annotated[
        str | None,
        typer.Option(help="Uncompressed teacher (default: the base the model was made from)."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: 2 x rank).")] = None,
    seq_len: Annotated[int, typer.Option(min=16, help="Tokens per training window.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW).")] = 5e-4,
    next_token_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the next-token loss mixed with the KL.")
    ] = 0.0,
    holdout: Annotated[
        int, typer.Option(min=0, help="Windows held out (from the end) for the KLD curve.")
    ] = 16,
    eval_every: Annotated[int, typer.Option(min=1, help="Held-out KLD every N steps.")] = 25,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Checkpoints and metrics.jsonl (default: MODEL/.recovery-run)."),
    ] = None,
    restart: Annotated[bool, typer.Option(help="Discard the run directory's checkpoint.")] = False,
    device: Annotated[
        str, typer.Option(help="Where to train: cpu, cuda, cuda:N, or auto (a GPU if present).")
    ] = "auto",
) -> None:
    """Train the accuracy-recovery adapter: LoRA on the frozen compressed model, distilled from
    the uncompressed model (KL on logits). It is saved in MODEL/recovery and attached whenever
    the model is loaded. Rerunning the same command resumes from the last checkpoint."""
    with user_errors():
        where = resolve_device(device)
        meta = read_compression_meta(model)
        teacher_name = teacher or meta.get("made_with", {}).get("base")
        with err_console.status("loading models…", spinner="dots"):
            student = load_named(model)
            reference = load_named(teacher_name)
        recovery = RecoveryConfig(
            rank=rank,
            alpha=alpha if alpha is not None else 2.0 * rank,
            seq_len=seq_len,
            next_token_weight=next_token_weight,
        )
        config = TrainConfig(
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            eval_every=eval_every,
            warmup_steps=min(20, steps),
        )
        run_dir = run_dir or model / ".recovery-run"
        if restart and run_dir.exists():
            shutil.rmtree(run_dir)
        progress, on_step = training_progress("recovery", loss_name="KL", eval_name="held-out KLD")
        provenance = {
            "teacher": str(teacher_name),
            "command": command_line(),
        }
        signature = student.signature()
        with progress:
            adapter, result = run_recovery(
                student.model,
                reference.model,
                student.tokenizer,
                data,
                run_dir,
                recovery,
                config,
                holdout=holdout,
                provenance=provenance,
                device=where,
                on_step=on_step,
            )
        adapter.metadata["base_signature"] = signature
        save_adapter(adapter, model / RECOVERY_DIR)
        print(
            f"recovery adapter saved in {model / RECOVERY_DIR}: held-out KLD"
            f" {result.eval_loss if result.eval_loss is not None else float('nan'):.4f}"
            f" after {result.tokens:,} tokens; metrics in {run_dir}/metrics.jsonl"
        )
