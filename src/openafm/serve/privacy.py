"""Private mode: logs of allow-listed fields only, no file written while serving, and a
manifest of exactly what is served (code and weights, by sha256)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import openafm
from openafm.files import sha256_file

LOG_FIELDS = frozenset(
    {
        "event",
        "request_id",
        "route",
        "model",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "n",
        "stream",
        "ttft_ms",
        "duration_ms",
        "finish_reason",
        "error_type",
        "queue",
        "batch",
        "host",
        "port",
        "adapters",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

log = logging.getLogger("openafm.serve")


def log_event(event: str, **fields: object) -> None:
    """One JSON log line of the allow-listed fields (anything else is dropped, not logged)."""
    record = {"event": event} | {k: v for k, v in fields.items() if k in LOG_FIELDS}
    log.info(json.dumps(record, sort_keys=True, default=str))


class ExceptionTypeOnly(logging.Filter):
    """For other libraries' loggers (uvicorn's): an exception is logged by its type alone,
    since its message or traceback may quote a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg, record.args = f"exception: {record.exc_info[0].__name__}", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


class WriteGuard:
    """A process-wide audit hook that, while armed, refuses to open any file for writing
    (devices under /dev excepted) and counts each refusal. Hooks cannot be removed: one guard
    per process, armed and disarmed around serving."""

    _instance: WriteGuard | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.armed = False
        self.refused = 0
        self.on_refuse: Callable[[], None] = lambda: None
        sys.addaudithook(self._hook)

    @classmethod
    def get(cls) -> WriteGuard:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _hook(self, event: str, args: tuple) -> None:
        if not self.armed or event != "open":
            return
        path, mode, flags = (*args, None, None)[:3]
        writes = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
            isinstance(mode, str) and any(c in mode for c in "wax+")
        )
        if not writes or isinstance(path, int):
            return
        name = os.fsdecode(path) if isinstance(path, str | bytes) else str(path)
        if name.startswith("/dev/"):
            return
        self.refused += 1
        self.on_refuse()
        raise PermissionError(f"private mode: no file is written while serving ({name})")


def code_sha256() -> str:
    """sha256 over the served package's Python sources (path and content, in path order)."""
    root = Path(openafm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def files_sha256(path: Path) -> dict[str, str]:
    """sha256 of a weights file, or of every file in a weights folder (relative names)."""
    if path.is_file():
        return {path.name: sha256_file(path)}
    files: Iterable[Path] = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): sha256_file(p) for p in files if not p.name.startswith(".")}
