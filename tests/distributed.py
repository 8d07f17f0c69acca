"""Run a function in N CPU processes joined by a `gloo` process group on loopback."""

from __future__ import annotations

import os
import socket
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world: int, port: int, done: str, target: Callable[..., None], args: tuple
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
        Path(done, f"rank{rank}").touch()
        dist.barrier()  # every rank has finished; gloo can abort if one tears down early
    finally:
        dist.destroy_process_group()


def run_processes(world: int, target: Callable[..., None], *args: object) -> None:
    """`target(rank, world, *args)` in `world` processes; a failure in any fails the call.

    A process that gloo aborts while tearing down, after every rank has finished its work, is
    reported as a warning, not a failure: the results are complete by then.
    """
    with tempfile.TemporaryDirectory() as done:
        try:
            mp.spawn(
                _entry, args=(world, _free_port(), done, target, args), nprocs=world, join=True
            )
        except mp.ProcessExitedException as exc:
            if len(list(Path(done).iterdir())) < world:
                raise
            warnings.warn(f"a process aborted after finishing its work: {exc}", stacklevel=2)
