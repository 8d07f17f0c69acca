"""`afm generate`: answer a prompt with the model, streaming the text."""

from __future__ import annotations

import sys
from typing import Annotated

import torch
import typer

from openafm.cli.common import (
    KernelOption,
    choose_kernel,
    err_console,
    load_named,
    print_json,
    read_prompt,
    user_errors,
)
from openafm.runtime import DraftModel, PromptLookup, SamplingParams, engine_for
from openafm.runtime.speculative import Drafter

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from standard input.")],
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", help="Wrap the prompt in the model's chat template.")
    ] = True,
    system: Annotated[
        str | None, typer.Option(help="System prompt (default: the chat template's own).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens to generate.")] = 256,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy (deterministic).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest (0: all).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop when this text appears (repeatable).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Known model name, .gguf file, or model directory (default: the on-device base)."
        ),
    ] = None,
    prefill_dtype: Annotated[
        str,
        typer.Option(
            help="Prompt-processing precision: float32 (exact) or bfloat16 (faster on CPUs with bf16 units)."
        ),
    ] = "float32",
    adapter: Annotated[
        str | None,
        typer.Option(help="Feature adapter to apply (name from `afm adapter list`, or a path)."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Use the adapter even if it was trained on another base.")
    ] = False,
    speculate: Annotated[
        bool,
        typer.Option(
            help="Speculative decoding: draft tokens from the prompt and the text so far, verify"
            " them in one step (greedy output is identical; sampling keeps its distribution)."
        ),
    ] = True,
    draft_model: Annotated[
        str | None,
        typer.Option(
            help="Draft with this model instead of the prompt (known name, .gguf file or"
            " directory sharing the tokenizer; e.g. smollm2-135m-palettized drafting for the"
            " float base)."
        ),
    ] = None,
    kernel: KernelOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Generate an answer. Chat is the default for instruct models; plain output streams the text."""
    choose_kernel(kernel)
    if prefill_dtype not in _DTYPES:
        raise typer.BadParameter(
            f"choose one of {', '.join(_DTYPES)}", param_hint="--prefill-dtype"
        )
    if top_p <= 0.0:
        raise typer.BadParameter("must be greater than 0", param_hint="--top-p")
    with user_errors():
        text = read_prompt(prompt)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop or ()),
        )
        with err_console.status("loading model…", spinner="dots"):
            pretrained = load_named(model)
            speculation: Drafter | None = PromptLookup() if speculate else None
            if speculate and draft_model is not None:
                speculation = DraftModel(load_named(draft_model).model)
        engine = engine_for(
            pretrained,
            prefill_dtype=_DTYPES[prefill_dtype],
            force_adapters=force,
            speculation=speculation,
        )
        ids = engine.encode(
            text, chat=chat and pretrained.tokenizer.chat_template is not None, system=system
        )
        if json_output:
            completion = engine.generate([ids], params, adapters=adapter)[0]
            print_json({**completion.to_dict(), "model": str(pretrained.path), "adapter": adapter})
            return
        for piece in engine.stream(ids, params, adapter):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
