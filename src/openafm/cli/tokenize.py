"""`afm tokenize`: the token ids of a text."""

from __future__ import annotations

from typing import Annotated

import typer

from openafm.cli.common import print_json, read_prompt, user_errors
from openafm.runtime import load_tokenizer_for


def tokenize(
    text: Annotated[str, typer.Argument(help="Text to tokenize; '-' reads standard input.")],
    model: Annotated[
        str | None, typer.Option(help="Known model name, .gguf file, or model directory.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print ids and token strings as JSON.")
    ] = False,
) -> None:
    """Print the token ids of TEXT (special tokens written in the text are recognised; no BOS added)."""
    with user_errors():
        tokenizer = load_tokenizer_for(model)
        ids = tokenizer.encode(read_prompt(text), add_bos=False)
    if json_output:
        print_json({"ids": ids, "tokens": [tokenizer.backend.id_to_token(i) for i in ids]})
    else:
        print(" ".join(map(str, ids)))
