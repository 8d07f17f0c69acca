"""Training checkpoints with `torch.distributed.checkpoint` (DCP): sharded, resumable on another
mesh or process count, written atomically, the last N kept.

A checkpoint is `RUN_DIR/checkpoints/step-NNNNNNNN/`: DCP's files (model, optimizer state, RNG)
plus `trainer.json` (step, model config, data fingerprint, and the sha256 of every file). It is
written under a temporary name and renamed once complete, so a crash never leaves a
half-written checkpoint under a final name. Loading takes the newest checkpoint whose files
match their checksums and which DCP reads; a corrupt one is skipped with a warning. On a GPU
the write runs in the background (DCP's `async_save`) while training goes on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from openafm.files import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

META = "trainer.json"
PREFIX = "step-"


class CheckpointMismatchError(ValueError):
    """A checkpoint written for another model than the one being trained."""


def _step_of(path: Path) -> int | None:
    name = path.name
    if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() and (path / META).is_file():
        return int(name[len(PREFIX) :])
    return None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `run_dir`, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(s for p in root.iterdir() if (s := _step_of(p)) is not None)


class Checkpointer:
    """Saves and restores a run's training state under `run_dir/checkpoints`."""

    def __init__(self, run_dir: Path, keep: int, *, background: bool = False) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.background = background
        self.rank = dist.get_rank()
        # a background save talks over its own gloo group, never the training's GPU collectives
        self._group = dist.new_group(backend="gloo") if background else None
        self._pending: tuple[Future, Path, int, dict[str, Any]] | None = None

    def _path(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:08d}"

    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict
    ) -> None:
        """Write the state after `step` optimizer steps (waits for a previous background save)."""
        self.wait()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
        tmp = self.root / f".{PREFIX}{step:08d}.partial"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if self.background:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = (future, tmp, step, meta)  # type: ignore[assignment]
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp, step, meta)

    def wait(self) -> None:
        """Finish a background save (call before exiting)."""
        if self._pending is not None:
            future, tmp, step, meta = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, step, meta)

    def _finalize(self, tmp: Path, step: int, meta: dict[str, Any]) -> None:
        dist.barrier()  # every rank's files are written
        if self.rank == 0:
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            write_json_atomic(tmp / META, {**meta, "step": step, "files": files})
            final = self._path(step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoint_steps(self.root.parent)[: -self.keep]:
                shutil.rmtree(self._path(old), ignore_errors=True)
        dist.barrier()

    def _intact(self, path: Path) -> bool:
        """Rank 0 checks the files against their checksums; every rank gets the verdict."""
        verdict = [True]
        if self.rank == 0:
            try:
                files = json.loads((path / META).read_text())["files"]
                verdict[0] = all(sha256_file(path / n) == h for n, h in files.items())
            except (OSError, ValueError, KeyError):
                verdict[0] = False
        dist.broadcast_object_list(verdict, src=0)
        return bool(verdict[0])

    def load(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any],
    ) -> dict[str, Any] | None:
        """Restore the newest intact checkpoint; its `trainer.json`, or None if there is none."""
        for step in reversed(checkpoint_steps(self.root.parent)):
            path = self._path(step)
            meta = json.loads((path / META).read_text())
            if meta.get("model_config") != model_config:
                raise CheckpointMismatchError(
                    f"{path} was written for another model ({meta.get('model_config')});"
                    " resume with the config it was trained with, or use a new --out"
                )
            if not self._intact(path):
                log.warning(
                    "checkpoint %s is corrupt (checksum mismatch): trying an older one", path
                )
                continue
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
            try:
                dcp.load(state, checkpoint_id=str(path))
            except Exception as exc:  # DCP gathers every rank's failure into one exception
                log.warning("checkpoint %s cannot be read (%s): trying an older one", path, exc)
                continue
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            torch.set_rng_state(state["rng"])
            return meta
        return None
