"""A command group whose subcommands are imported when they run, not when `afm` starts: each
subcommand's module imports its own dependencies (PyTorch, the data and evaluation libraries),
so `afm --help` is fast and one command does not need another's libraries."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from difflib import get_close_matches
from typing import ClassVar

import typer
from typer.core import TyperCommand, TyperGroup

try:  # recent typer vendors click: its classes are the ones TyperGroup works with
    from typer import _click as click
except ImportError:  # older typer uses click itself
    import click  # type: ignore[no-redef]


@dataclass(frozen=True)
class LazyCommand:
    """Where a subcommand lives (`module`, and `attribute`: a command function or a Typer app)
    and the one-line summary of its help that `afm --help` shows."""

    module: str
    attribute: str
    summary: str


def load_command(name: str, entry: LazyCommand) -> click.Command:
    """Import `entry` and build its click command."""
    target = getattr(importlib.import_module(entry.module), entry.attribute)
    if isinstance(target, typer.Typer):  # a group, even of one command (as add_typer makes it)
        outer = typer.Typer(add_completion=False)
        outer.add_typer(target, name=name)
        command = typer.main.get_command(outer).commands[name]  # type: ignore[attr-defined]
    else:
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    return command


class LazyGroup(TyperGroup):
    """Subclass with `lazy` set to the subcommands; help lists them without importing them."""

    lazy: ClassVar[dict[str, LazyCommand]] = {}
    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in self.lazy if n not in self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        entry = self.lazy[cmd_name]
        if self._listing:
            return TyperCommand(cmd_name, help=entry.summary)
        self.commands[cmd_name] = load_command(cmd_name, entry)
        return self.commands[cmd_name]

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except Exception as error:  # click's UsageError: no such command
            message = getattr(error, "message", None)
            matches = get_close_matches(args[0], self.list_commands(ctx)) if args else []
            if isinstance(message, str) and matches and "Did you mean" not in message:
                suggestions = ", ".join(repr(m) for m in matches)
                error.message = f"{message.rstrip('.')}. Did you mean {suggestions}?"  # type: ignore[attr-defined]
            raise
