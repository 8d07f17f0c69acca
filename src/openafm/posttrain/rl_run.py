"""An RL run on disk: prompts in a fixed seeded order, one checkpoint per iteration (policy,
reference, optimizer; written atomically) and one metrics line per iteration, so rerunning the
same command after a kill continues where it stopped and draws the same rollouts."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from openafm.adapters.trainer import save_checkpoint
from openafm.files import cut_log
from openafm.posttrain.rl import PolicyTrainer

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class RunMismatchError(ValueError):
    """A run directory holds a checkpoint made with other settings."""


@dataclass(frozen=True)
class RLRun:
    """Where a run writes, how long it runs and how many prompts each iteration samples."""

    run_dir: Path
    iterations: int
    prompts_per_iteration: int = 8
    seed: int = 0


def prompt_batches(n: int, per_batch: int, iteration: int, seed: int) -> list[int]:
    """The prompt indices of an iteration: epochs of a seeded permutation, cut in batches."""
    if per_batch > n:
        raise ValueError(f"{per_batch} prompts per iteration, but only {n} prompts")
    per_epoch = n // per_batch
    epoch, index = divmod(iteration, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[index * per_batch : (index + 1) * per_batch]


def _resume(trainer: PolicyTrainer, run_dir: Path, key: str) -> list[dict[str, float]]:
    """Load the checkpoint into `trainer`; the metrics of the iterations it covers."""
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    if state["settings_key"] != key:
        raise RunMismatchError(
            f"{run_dir} holds a run with other settings or prompts; use another --run-dir,"
            " or --restart to discard it"
        )
    with torch.no_grad():
        for p, saved in zip(trainer.adapter.parameters(), state["policy"], strict=True):
            p.copy_(saved)
        for p, saved in zip(trainer.reference.parameters(), state["reference"], strict=True):
            p.copy_(saved)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.iteration = int(state["iteration"])
    return cut_log(run_dir / METRICS, lambda r: r["iteration"] <= trainer.iteration)


def run_rl(
    trainer: PolicyTrainer,
    prompts: Sequence[Sequence[int]],
    run: RLRun,
    *,
    settings_key: str,
    on_iteration: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Iterate until `run.iterations`, resuming from the run directory's checkpoint; returns
    every iteration's metrics (reward, KL to the reference and to the rollout policy, length,
    empty-answer rate, seconds)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    if (run.run_dir / CHECKPOINT).exists():
        history = _resume(trainer, run.run_dir, settings_key)
    with (run.run_dir / METRICS).open("a") as metrics:
        while trainer.iteration < run.iterations:
            keys = prompt_batches(
                len(prompts), run.prompts_per_iteration, trainer.iteration, run.seed
            )
            start = time.perf_counter()
            stats = trainer.step([prompts[k] for k in keys], keys)
            stats["seconds"] = round(time.perf_counter() - start, 2)
            save_checkpoint(
                run.run_dir / CHECKPOINT,
                {
                    "settings_key": settings_key,
                    "iteration": trainer.iteration,
                    "policy": [p.detach().clone() for p in trainer.adapter.parameters()],
                    "reference": [p.detach().clone() for p in trainer.reference.parameters()],
                    "optimizer": trainer.optimizer.state_dict(),
                },
            )
            metrics.write(json.dumps(stats) + "\n")
            metrics.flush()
            history.append(stats)
            if on_iteration is not None:
                on_iteration(stats)
    return history
