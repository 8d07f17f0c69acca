"""`afm adapter train|list|show|rm|export|import`: feature adapters (LoRA) on the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from openafm.adapters import (
    TARGETS,
    LoraConfig,
    load_adapter,
    read_adapter_meta,
    save_adapter,
)
from openafm.adapters.peft_format import export_peft, import_peft
from openafm.adapters.registry import find_adapter, list_adapters, remove_adapter, user_adapters_dir
from openafm.adapters.sft import SftRun, run_full_sft, run_sft
from openafm.adapters.sft_data import read_conversations
from openafm.adapters.trainer import TrainConfig
from openafm.cli.common import (
    command_line,
    err_console,
    load_named,
    print_json,
    training_progress,
    user_errors,
)
from openafm.features import get_feature
from openafm.files import read_jsonl, sha256_file
from openafm.io import openafm_home

app = typer.Typer(help="Train, list, inspect and convert feature adapters.", no_args_is_help=True)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'all' / None, or a list like '0-5,10,12'."""
    if text is None or text == "all":
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise typer.BadParameter("use 'all' or a list like 0-5,10", param_hint="--layers") from None
    return tuple(layers)


def _conversations(path: Path, feature: str | None) -> list[list[dict[str, str]]]:
    if feature is None:
        return read_conversations(path)
    records = [record for _, record in read_jsonl(path)]
    if not records:
        raise ValueError(f"training data {path} holds no examples")
    return get_feature(feature).training_conversations(records)


@app.command()
def train(
    data: Annotated[
        Path, typer.Option(help="Chat JSONL ({'messages': [...]}, or prompt/completion).")
    ],
    name: Annotated[str, typer.Option(help="Adapter name (letters, digits, '.', '_', '-').")],
    feature: Annotated[
        str | None,
        typer.Option(
            help="Read --data as that feature's records (e.g. summarize-email) and render them with its prompt."
        ),
    ] = None,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank).")] = 32.0,
    targets: Annotated[
        str, typer.Option(help=f"Comma-separated projections among {','.join(TARGETS)}.")
    ] = ",".join(TARGETS),
    layers: Annotated[
        str | None, typer.Option(help="Layers to adapt: 'all' or e.g. '0-5,10'.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Optimizer steps (default: 200).")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option(min=0.0, help="Passes over the data (instead of --steps).")
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW).")] = 2e-4,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Examples (rows, with --pack) per batch.")
    ] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimizer step.")] = 1,
    seq_len: Annotated[
        int, typer.Option(min=8, help="Longest example in tokens (longer ones are left out).")
    ] = 512,
    pack: Annotated[
        bool,
        typer.Option(
            help="Pack several conversations into each row of --seq-len tokens; each attends"
            " only to itself (fewer, fuller rows)."
        ),
    ] = False,
    warmup: Annotated[int, typer.Option(min=0, help="Warmup steps.")] = 10,
    eval_data: Annotated[
        Path | None, typer.Option(help="Held-out data (same format) for the eval loss.")
    ] = None,
    holdout: Annotated[
        int,
        typer.Option(
            min=0,
            help="Hold out the last N examples of --data for the eval loss (when no --eval-data).",
        ),
    ] = 0,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between eval losses.")] = 50,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Start from this adapter (name or path) (default: a compressed base's recovery"
            " adapter, else a fresh adapter)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the on-device base).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Adapter directory (default: $OPENAFM_HOME/adapters/NAME).")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoints and metrics (default: $OPENAFM_HOME/runs/adapters/NAME, or"
            " runs/finetuned/NAME with --full)."
        ),
    ] = None,
    restart: Annotated[
        bool, typer.Option(help="Discard the run directory's checkpoint instead of resuming.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter directory.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for the adapter's init and the data order.")] = 0,
    full: Annotated[
        bool,
        typer.Option(
            help="Fine-tune every weight of a dense base instead of a LoRA adapter (the LoRA"
            " options do not apply); --out (default: $OPENAFM_HOME/finetuned/NAME) is then a model"
            " directory for --model."
        ),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end.")
    ] = False,
) -> None:
    """Train a LoRA adapter on the frozen base (SFT), or with --full every weight; rerun the
    same command to resume after a crash."""
    if steps is not None and epochs is not None:
        raise typer.BadParameter("give --steps or --epochs, not both", param_hint="--epochs")
    if full and init_from is not None:
        raise typer.BadParameter(
            "--full trains the base's own weights, not an adapter", param_hint="--init-from"
        )
    with user_errors():
        lora = LoraConfig(
            rank=rank,
            alpha=alpha,
            targets=tuple(t for t in targets.split(",") if t),
            layers=parse_layers(layers),
        )
        config = TrainConfig(
            steps=steps or 200,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            warmup_steps=warmup,
            eval_every=eval_every,
            seed=seed,
        )
        conversations = _conversations(data, feature)
        held_out = _conversations(eval_data, feature) if eval_data else []
        if holdout and not eval_data:
            if holdout >= len(conversations):
                raise typer.BadParameter(
                    "must leave some training examples", param_hint="--holdout"
                )
            conversations, held_out = conversations[:-holdout], conversations[-holdout:]
        with err_console.status("loading model…", spinner="dots"):
            pretrained = load_named(model)
            signature = pretrained.signature()
        default_out = openafm_home() / "finetuned" / name if full else user_adapters_dir() / name
        run = SftRun(
            name=name,
            out_dir=out or default_out,
            run_dir=run_dir or openafm_home() / "runs" / ("finetuned" if full else "adapters") / name,
            seq_len=seq_len,
            pack=pack,
            epochs=epochs,
            init_from=None if full else find_adapter(init_from) if init_from else pretrained.default_adapter,
            restart=restart,
            overwrite=overwrite,
        )  # fmt: skip
        provenance = {
            "command": command_line(),
            "data": data.name,
            "data_sha256": sha256_file(data),
            "feature": feature,
            "base_model": str(pretrained.path.name),
        }
        progress, on_step = training_progress(f"training {name}")
        with progress:
            if full:
                result = run_full_sft(
                    pretrained.model,
                    pretrained.tokenizer,
                    signature,
                    conversations,
                    run,
                    config,
                    eval_conversations=held_out,
                    provenance=provenance,
                    on_step=on_step,
                )
            else:
                _, result = run_sft(
                    pretrained.model,
                    pretrained.tokenizer,
                    signature,
                    conversations,
                    run,
                    lora,
                    config,
                    eval_conversations=held_out,
                    provenance=provenance,
                    on_step=on_step,
                )
        summary = {
            "name": name,
            "path": str(run.out_dir),
            "full": full,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "final_loss": round(result.final_loss, 4),
            "eval_loss": None if result.eval_loss is None else round(result.eval_loss, 4),
            "tokens": result.tokens,
            "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else None,
            "peak_rss_mb": round(result.peak_rss_mb),
        }
        if json_output:
            print_json(summary)
        else:
            what = "the fine-tuned model" if full else name
            err_console.print(
                f"saved {what} to {run.out_dir} (loss {summary['final_loss']}, eval {summary['eval_loss']})"
            )


@app.command("list")
def list_cmd(
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """Adapters in $OPENAFM_HOME/adapters and those shipped with OpenAFM."""
    with user_errors():
        rows = list_adapters()
        if json_output:
            print_json(rows)
            return
        table = Table("name", "source", "rank", "targets", "MB", "base")
        for row in rows:
            if "error" in row:
                table.add_row(
                    str(row["name"]), str(row["source"]), "-", f"[red]{row['error']}[/]", "-", "-"
                )
                continue
            table.add_row(
                str(row["name"]),
                str(row["source"]),
                str(row["rank"]),
                ",".join(row["targets"]),  # type: ignore[arg-type]
                f"{int(row['bytes']) / 1e6:.1f}",  # type: ignore[call-overload]
                str(row["base_signature"] or "?")[:12],
            )
        Console().print(table)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Adapter name or path.")],
) -> None:
    """Print an adapter's adapter.json (settings, base signature, training, evaluation)."""
    with user_errors():
        path = find_adapter(name)
        print_json({"path": str(path), **read_adapter_meta(path)})


@app.command()
def rm(
    name: Annotated[str, typer.Argument(help="Adapter name (in $OPENAFM_HOME/adapters).")],
) -> None:
    """Delete one of your adapters (shipped adapters stay)."""
    with user_errors():
        path = remove_adapter(name)
        err_console.print(f"removed {path}")


@app.command("export")
def export_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name or path.")],
    out: Annotated[Path, typer.Option(help="Directory to write.")],
    fmt: Annotated[str, typer.Option("--format", help="Output layout: peft.")] = "peft",
) -> None:
    """Write an adapter in Hugging Face PEFT's layout (adapter_config.json + adapter_model.safetensors)."""
    if fmt != "peft":
        raise typer.BadParameter("only 'peft' is supported", param_hint="--format")
    with user_errors():
        adapter = load_adapter(find_adapter(name))
        export_peft(
            adapter, out, base_model=str(adapter.metadata.get("training", {}).get("base_model", ""))
        )  # type: ignore[union-attr]
        err_console.print(f"wrote {out}")


@app.command("import")
def import_cmd(
    source: Annotated[Path, typer.Argument(help="A PEFT LoRA directory.")],
    name: Annotated[str, typer.Option(help="Name for the imported adapter.")],
    model: Annotated[
        str | None, typer.Option(help="Base it belongs to (default: the on-device base).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an adapter of that name.")] = False,
) -> None:
    """Import a PEFT LoRA adapter into $OPENAFM_HOME/adapters, bound to the base it fits."""
    with user_errors():
        adapter = import_peft(source, name)
        target = user_adapters_dir() / adapter.name
        if target.exists() and not overwrite:
            raise ValueError(f"adapter {adapter.name!r} exists; pass --overwrite to replace it")
        with err_console.status("checking it against the base…", spinner="dots"):
            pretrained = load_named(model)
            adapter.check_fits(pretrained.model)
            adapter.metadata["base_signature"] = pretrained.signature()
        save_adapter(adapter, target)
        err_console.print(f"imported {adapter.name} to {target}")
