"""`afm model fetch|info`: the model cache and what a checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from openafm import kernels
from openafm.cli.common import (
    KernelOption,
    choose_kernel,
    err_console,
    load_named,
    print_json,
    user_errors,
)
from openafm.io import DEFAULT_MODEL, KNOWN_MODELS, fetch_model
from openafm.model.compressed import is_compressed

app = typer.Typer(help="Fetch models into the cache and inspect them.", no_args_is_help=True)


@app.command()
def fetch(
    name: Annotated[
        str, typer.Argument(help=f"Known model ({', '.join(KNOWN_MODELS)}).")
    ] = DEFAULT_MODEL,
    force: Annotated[
        bool, typer.Option(help="Download again even if a verified copy is cached.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Put a known model into the cache ($OPENAFM_HOME, default ~/.cache/openafm), verified by sha256."""
    with user_errors():
        with err_console.status(f"fetching {name}…", spinner="dots"):
            path = fetch_model(name, force=force)
        if json_output:
            print_json({"name": name, "path": str(path), "sha256": KNOWN_MODELS[name].sha256})
        else:
            print(path)


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@app.command()
def info(
    model: Annotated[
        str | None, typer.Option(help="Known model name, .gguf file, or model directory.")
    ] = None,
    kernel: KernelOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Config, parameter count, bytes on disk and in memory, signature, and the kernels in use."""
    choose_kernel(kernel)
    with user_errors():
        with err_console.status("loading model…", spinner="dots"):
            pretrained = load_named(model)
        m, ck = pretrained.model, pretrained.checkpoint
        memory = sum(p.nbytes for p in m.parameters()) + sum(b.nbytes for b in m.buffers())
        types: dict[str, int] = {}
        for t in ck.tensor_types.values():
            types[t] = types.get(t, 0) + 1
        data = {
            "path": str(pretrained.path),
            "format": ck.format,
            "config": ck.config.to_dict(),
            "parameters": ck.config.num_params(),  # a compressed weight is packed, not a Parameter
            "parameters_without_embedding": ck.config.num_params(embeddings=False),
            "bytes_on_disk": _disk_bytes(pretrained.path),
            "bytes_in_memory": memory,
            "tensor_types": types,
            "signature": pretrained.signature(),
            "vocab_size": pretrained.tokenizer.vocab_size,
            "chat_template": pretrained.tokenizer.chat_template is not None,
            "compressed": is_compressed(m),
            "kernel": kernels.mode() if is_compressed(m) else "dense (PyTorch)",
            "instruction_set": kernels.isa(),
        }
    if json_output:
        print_json(data)
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if key == "config":
            for k, v in value.items():
                table.add_row(f"config.{k}", str(v))
        else:
            big_int = isinstance(value, int) and not isinstance(value, bool)
            table.add_row(key, f"{value:,}" if big_int else str(value))
    Console().print(table)
