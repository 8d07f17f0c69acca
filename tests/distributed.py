"""Run a function in N CPU processes joined by a `gloo` process group on loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
        dist.barrier()  # gloo can abort if one rank tears down while another still talks
    finally:
        dist.destroy_process_group()


def run_processes(world: int, target: Callable[..., None], *args: object) -> None:
    """`target(rank, world, *args)` in `world` processes; a failure in any fails the call."""
    mp.spawn(_entry, args=(world, _free_port(), target, args), nprocs=world, join=True)
