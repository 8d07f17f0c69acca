"""`afm export coreml`: the compressed model as a Core ML package for Apple devices."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from openafm.adapters import detach
from openafm.cli.common import err_console, load_named, print_json, user_errors
from openafm.compress.coreml_export import export_coreml

app = typer.Typer(help="Export models for other runtimes.", no_args_is_help=True)


@app.command("coreml")
def coreml(
    out: Annotated[Path, typer.Option(help="Package to write (NAME.mlpackage).")],
    model: Annotated[
        str,
        typer.Option(help="Compressed model: a directory from afm compress, or a shipped name."),
    ] = "smollm2-135m-palettized",
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per call (fixed length).")] = 128,
    recovery: Annotated[
        bool, typer.Option(help="Keep the recovery adapter attached (as low-rank float16 ops).")
    ] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Convert with coremltools: palettized projections stay lookup tables
    (constexpr_lut_to_dense), the embedding stays 8-bit, for iOS 18 / macOS 15 and later.
    Converting works on Linux; running the package needs macOS (not done here)."""
    with user_errors():
        with err_console.status("loading model…", spinner="dots"):
            pretrained = load_named(model)
        if not recovery:
            detach(pretrained.model)
        with err_console.status("converting with coremltools…", spinner="dots"):
            summary = export_coreml(pretrained.model, out, seq_len=seq_len)
        if json_output:
            print_json({"out": str(out), **asdict(summary)})
            return
        print(
            f"wrote {out}: {summary.lut_ops} lookup-table weights, {summary.int8_ops} int8/scale"
            f" ops, {summary.weight_bytes / 2**20:.1f} MiB of weights, {summary.ops} ops"
        )
