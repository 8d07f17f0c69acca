"""`afm <noun> <verb>`: the command line. Thin: parse, call the library, print."""

from __future__ import annotations

from typing import Annotated

import typer

from openafm import __version__
from openafm.cli import adapter, data, eval, export, model, posttrain, train
from openafm.cli.common import setup_logging
from openafm.cli.compress import compress, recover
from openafm.cli.generate import generate
from openafm.cli.serve import serve
from openafm.cli.tokenize import tokenize

app = typer.Typer(
    name="afm",
    help="OpenAFM: on-device foundation model tools (generate, serve, tokenize, models, data, adapters, post-training, compression, evaluation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(generate)
app.command()(tokenize)
app.command()(compress)
app.command()(recover)
app.command()(serve)
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(adapter.app, name="adapter")
app.add_typer(eval.app, name="eval")
app.add_typer(export.app, name="export")
app.add_typer(train.app, name="train")
app.add_typer(posttrain.app, name="posttrain")


def _version(value: bool) -> None:
    if value:
        print(f"openafm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    setup_logging(verbose)


def main() -> None:
    app()
