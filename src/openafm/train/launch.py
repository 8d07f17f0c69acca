"""Run one command in N local processes, as `torchrun --standalone` would, but so that a failure
reads as one line: each rank writes its user-facing error to its own file (the path is in
`ERROR_FILE_ENV`), the launcher stops the other ranks at the first failure and returns that
rank's error, and nothing else is printed on top of it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ERROR_FILE_ENV = "OPENAFM_ERROR_FILE"
LAUNCHED_ENV = "OPENAFM_LAUNCHED"


@dataclass(frozen=True)
class LaunchResult:
    """How the ranks ended: 0 when all succeeded, else the first failing rank's status, and
    the error it reported ({"error": ..., "hint": ...}), when it reported one."""

    status: int
    rank: int | None = None
    error: dict[str, str] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads_per_rank(nproc: int) -> int:
    """The machine's cores shared among the ranks (at least one each)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def write_rank_error(message: str, hint: str | None) -> bool:
    """In a launched rank, record its error for the launcher; False when not launched."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    Path(path).write_text(json.dumps({"error": message, "hint": hint or ""}))
    return True


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_local(args: Sequence[str], nproc: int, *, poll_s: float = 0.1) -> LaunchResult:
    """Run `python -m openafm ARGS` in `nproc` processes joined in one process group (rank
    0..nproc-1 on this machine); wait for all of them, or stop the rest at the first failure."""
    port = free_port()

    def stop_on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a terminated launcher stops its ranks too

    previous = signal.signal(signal.SIGTERM, stop_on_term)
    with tempfile.TemporaryDirectory(prefix="afm-launch-") as errors:
        procs = []
        for rank in range(nproc):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_rank(nproc))),
                LAUNCHED_ENV: "1",
                ERROR_FILE_ENV: str(Path(errors) / f"rank-{rank}.json"),
            }
            procs.append(subprocess.Popen([sys.executable, "-m", "openafm", *args], env=env))
        try:
            while True:
                codes = [proc.poll() for proc in procs]
                failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    rank, status = failed[0]
                    _stop(procs)
                    report = Path(errors) / f"rank-{rank}.json"
                    error = json.loads(report.read_text()) if report.exists() else None
                    return LaunchResult(status if status > 0 else 1, rank, error)
                if all(c == 0 for c in codes):
                    return LaunchResult(0)
                time.sleep(poll_s)
        except KeyboardInterrupt:
            _stop(procs)
            return LaunchResult(130)
        finally:
            signal.signal(signal.SIGTERM, previous)
