"""`afm train`: pre-train (or distil) a model on one or many processes; plot a run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from openafm.adapters.trainer import StepReport
from openafm.cli.common import (
    err_console,
    print_error,
    print_json,
    training_progress,
    user_errors,
)
from openafm.train.config import DistillMode, Optimizer, TrainConfig, load_train_config

app = typer.Typer(
    help=(
        "Pre-train a decoder of the seed's architecture from scratch: `afm train --config NAME"
        " --data PATH --out RUN_DIR`. Runs in one process, in N local processes (--nproc), or"
        " under torchrun (`torchrun ... -m openafm train ...`), on any --mesh."
    ),
    no_args_is_help=True,
    invoke_without_command=True,
)

ConfigOpt = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        help="A training preset (tiny, afm-tiny, afm-1b) or a .json/.toml file of its fields."
        " On text data, a preset whose vocabulary is smaller than --tokenizer's grows to fit it"
        " (the tiny preset's 512 becomes 49,152 with the default tokenizer).",
    ),
]
DataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        "-d",
        help="Token-shard folder, .txt or .jsonl file (repeat for several).",
    ),
]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="The run directory.")]
MeshOpt = Annotated[
    str,
    typer.Option(
        help="Mesh over the processes, e.g. dp_shard=2,tp=2 (dimensions dp_replicate, dp_shard,"
        " cp, tp; -1 = the rest; dp_shard takes the rest by default)."
    ),
]
NprocOpt = Annotated[
    int,
    typer.Option(
        help="Start N local processes (gloo on the CPU, nccl on GPUs); cores are shared among them."
    ),
]
StepsOpt = Annotated[int | None, typer.Option(help="Optimizer steps (overrides the config).")]
ResumeOpt = Annotated[
    bool, typer.Option(help="Continue from the run directory's newest intact checkpoint.")
]
TokenizerOpt = Annotated[
    str,
    typer.Option(help="Model whose tokenizer reads text data and is saved with the weights."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto (a GPU when present), cpu or cuda.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")]


def _relaunch(nproc: int) -> None:
    """Run this same command in `nproc` local processes; exit with their status, after the
    first failing rank's error in one line."""
    from openafm.train.launch import launch_local

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    result = launch_local(args, nproc)
    if result.error is not None:
        print_error(result.error["error"], result.error["hint"] or None)
    elif result.status == 130:
        err_console.print("interrupted")
    elif result.status:
        print_error(f"rank {result.rank} failed with exit status {result.status} (see above)")
    raise typer.Exit(1 if result.status not in (0, 130) else result.status)


def _run(
    config: TrainConfig,
    data: list[Path] | None,
    out: Path | None,
    mesh: str,
    nproc: int,
    resume: bool,
    tokenizer: str,
    device: str,
    as_json: bool,
    teacher: str = "",
) -> None:
    from openafm.runtime import load_tokenizer_for
    from openafm.train.mesh import MeshSpec
    from openafm.train.trainer import train

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(nproc)
    if out is None or not data:
        raise typer.BadParameter("give --data PATH and --out RUN_DIR")
    rank = int(os.environ.get("RANK", 0))
    with user_errors():
        spec = MeshSpec.parse(mesh)
        tok = load_tokenizer_for(tokenizer)
        teacher_model = None
        if teacher:
            from openafm.io import load_model

            teacher_model, _ = load_model(teacher)
        progress, show = training_progress("train" if not teacher else "distil")

        def on_step(record: dict[str, Any]) -> None:
            show(
                StepReport(
                    step=record["step"],
                    steps=config.steps,
                    loss=record["loss"],
                    lr=record["lr"],
                    tokens_per_s=record["tokens_per_s"],
                    eval_loss=record.get("val_loss"),
                )
            )

        if rank == 0:
            progress.start()
        try:
            summary = train(
                config,
                list(data),
                out,
                mesh=spec,
                tokenizer=tok,
                teacher=teacher_model,
                resume=resume,
                device=device,
                on_step=on_step,
            )
        finally:
            progress.stop()
    if rank != 0:
        return
    if as_json:
        print_json(summary.to_dict())
        return
    val = f", held-out loss {summary.val_loss:.4f}" if summary.val_loss is not None else ""
    err_console.print(
        f"trained {summary.parameters / 1e6:.1f}M parameters for {summary.steps} steps"
        f" on {summary.world_size} process(es) {summary.mesh}: loss {summary.final_loss:.4f}{val},"
        f" {summary.tokens_per_s:,.0f} tokens/s, MFU {100 * summary.mfu:.1f}%"
        f" of a measured {summary.peak_flops / 1e12:.2f} TFLOP/s bf16 peak"
    )
    print(summary.run_dir)


def _config(config: str, **overrides: Any) -> TrainConfig:
    with user_errors():
        return load_train_config(config).replace(**overrides)


@app.callback()
def train_command(
    ctx: typer.Context,
    config: ConfigOpt = "afm-tiny",
    data: DataOpt = None,
    out: OutOpt = None,
    mesh: MeshOpt = "",
    nproc: NprocOpt = 1,
    steps: StepsOpt = None,
    resume: ResumeOpt = False,
    optimizer: Annotated[
        Optimizer | None, typer.Option(help="adamw or rmsprop-momentum (the seed's).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step, all ranks.")] = None,
    micro_batch: Annotated[
        int | None, typer.Option(help="Sequences per forward on one rank (accumulation).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    tokenizer: TokenizerOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Pre-train from scratch (see `afm train --help`); subcommands distil and plot."""
    if ctx.invoked_subcommand is not None:
        return
    cfg = _config(
        config,
        steps=steps,
        optimizer=optimizer,
        batch_size=batch_size,
        micro_batch=micro_batch,
        seq_len=seq_len,
        lr=lr,
    )
    _run(cfg, data, out, mesh, nproc, resume, tokenizer, device, as_json)


@app.command()
def distill(
    teacher: Annotated[
        str, typer.Option(help="The teacher: a model name, GGUF file or HF directory.")
    ],
    config: ConfigOpt = "afm-tiny",
    data: DataOpt = None,
    out: OutOpt = None,
    mesh: MeshOpt = "",
    nproc: NprocOpt = 1,
    steps: StepsOpt = None,
    resume: ResumeOpt = False,
    mode: Annotated[
        DistillMode, typer.Option(help="top1: 0.9·teacher top-1 + 0.1·label (the seed's); kl.")
    ] = "top1",
    teacher_weight: Annotated[float, typer.Option(help="Weight of the teacher (top1).")] = 0.9,
    tokenizer: TokenizerOpt = "smollm2-135m-instruct",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Pre-train a student from scratch on a teacher's predictions (same tokenizer)."""
    cfg = _config(
        config, steps=steps, teacher=teacher, distill_mode=mode, teacher_weight=teacher_weight
    )
    _run(cfg, data, out, mesh, nproc, resume, tokenizer, device, as_json, teacher=teacher)


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more training run directories.")],
    out: Annotated[
        Path | None, typer.Option(help="PNG path (one run: RUN_DIR/curves.png by default).")
    ] = None,
) -> None:
    """Draw a run's loss and throughput curves to a PNG, or several runs' side by side (RL runs
    of `afm posttrain rl`: reward, KL to reference and old policy, length, empty rate)."""
    from openafm.posttrain.plot import is_rl_run, plot_rl_runs
    from openafm.train.plot import plot_runs

    with user_errors():
        if run_dirs and is_rl_run(run_dirs[0]):
            print(plot_rl_runs(run_dirs, out))
        else:
            print(plot_runs(run_dirs, out))
