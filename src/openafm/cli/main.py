"""`afm <noun> <verb>`: the command line. Thin: parse, call the library, print."""

from __future__ import annotations

from typing import Annotated, ClassVar

import typer

from openafm import __version__
from openafm.cli.lazy import LazyCommand, LazyGroup


def _at(module: str, attribute: str, summary: str) -> LazyCommand:
    return LazyCommand(f"openafm.cli.{module}", attribute, summary)


class Afm(LazyGroup):
    """`afm`'s subcommands, each imported only when it runs."""

    lazy: ClassVar[dict[str, LazyCommand]] = {
        "generate": _at("generate", "generate", "Generate an answer."),
        "tokenize": _at("tokenize", "tokenize", "Print the token ids of TEXT."),
        "compress": _at(
            "compress", "compress", "Palettize every projection to meet a bits-per-weight budget."
        ),
        "recover": _at("compress", "recover", "Train the accuracy-recovery adapter."),
        "serve": _at("serve", "serve", "Serve the model and its feature adapters over HTTP."),
        "model": _at("model", "app", "Fetch models into the cache and inspect them."),
        "data": _at("data", "app", "Curate web data into clean, deduplicated documents."),
        "adapter": _at("adapter", "app", "Train, list, inspect and convert feature adapters."),
        "eval": _at("eval", "app", "Measure quality: summaries, instruction following, safety."),
        "export": _at("export", "app", "Export models for other runtimes."),
        "train": _at("train", "app", "Pre-train a decoder of the seed's architecture."),
        "posttrain": _at("posttrain", "app", "Post-training: SFT, the reward model, RS, RL."),
    }


app = typer.Typer(
    name="afm",
    cls=Afm,
    help="OpenAFM: on-device foundation model tools (generate, serve, tokenize, models, data, adapters, post-training, compression, evaluation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
    from openafm.cli.common import setup_logging

    setup_logging(verbose)


def main() -> None:
    app()
