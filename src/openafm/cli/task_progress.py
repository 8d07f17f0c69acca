"""Progress of datatrove executors, read from their logging folders, while their logs go to a file."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _phases(logs: Path) -> list[tuple[str, int, int]]:
    """(phase, tasks done, tasks) for every executor that has started, in start order."""
    found = []
    for folder in logs.iterdir() if logs.is_dir() else []:
        info = folder / "executor.json"
        if info.is_file():
            try:
                tasks = int(json.loads(info.read_text())["tasks"])
            except (ValueError, KeyError):
                continue
            done = len(list((folder / "completions").glob("*")))
            found.append((info.stat().st_mtime, folder.name, done, tasks))
    return [(name, done, tasks) for _, name, done, tasks in sorted(found)]


@contextmanager
def logs_to_file_with_progress(logs: Path) -> Iterator[None]:
    """Standard error (worker processes included) goes to `logs/curate.log`; the terminal shows
    one bar per pipeline phase, counting finished tasks."""
    logs.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = Console(file=os.fdopen(os.dup(saved), "w"), stderr=True)
    stop = threading.Event()
    progress = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=terminal,
    )
    bars: dict[str, int] = {}

    def refresh() -> None:
        for name, done, tasks in _phases(logs):
            if name not in bars:
                bars[name] = progress.add_task(name, total=tasks)
            progress.update(bars[name], completed=done)

    def watch() -> None:
        while not stop.wait(0.25):
            refresh()

    watcher = threading.Thread(target=watch, daemon=True)
    with open(logs / "curate.log", "ab") as log, progress:
        os.dup2(log.fileno(), 2)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
            refresh()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
