"""The adapter trainer (SFT): LoRA on a frozen base, resumable from its last checkpoint.

bf16 autocast over a bf16 copy of the frozen projections (the base never changes, so it is
cast once), float32 adapter weights, AdamW on the adapter only, linear warmup then cosine decay
to a floor, global-norm gradient clipping, gradient accumulation, and a periodic loss on
held-out data. The run directory holds `checkpoint.pt` (adapter, optimizer, scheduler, step;
written atomically every few steps) and `metrics.jsonl`; rerunning the same command continues
from the checkpoint with the same data order and ends at the same loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from openafm.adapters.lora import LoraAdapter, LoraConfig
from openafm.adapters.sft_data import IGNORE, Example, collate, epoch_batches, segment_ids
from openafm.files import cut_log
from openafm.model import Linear, Transformer
from openafm.model.compressed import dense_copies, is_compressed

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


LossFn = Callable[
    [Transformer, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, int]
]
"""`(model, tokens, labels, segments) -> (summed loss, positions)`: what a run minimises.
`segments` numbers the conversations packed into each row (None when rows are not packed)."""


class ResumeError(ValueError):
    """A run directory holds a checkpoint made with other settings."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of an adapter run (one step = `grad_accum` batches)."""

    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 10
    seed: int = 0
    bf16: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1")
        if not self.lr > 0:
            raise ValueError("lr must be positive")

    def lr_at(self, step: int) -> float:
        """Learning-rate multiplier after `step` optimizer steps: warmup, then cosine to a floor."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


@dataclass
class StepReport:
    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float
    eval_loss: float | None = None


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    eval_loss: float | None
    tokens: int
    seconds: float
    resumed_from: int
    peak_rss_mb: float


def freeze_base(model: Transformer, *, bf16: bool) -> None:
    """No gradients for the base; with `bf16` its projections become bf16 once (they never change).

    Compressed projections stay compressed; during training they compute from bf16 copies made
    once (`dense_copies`), so a step costs what it costs on a dense base.
    """
    model.requires_grad_(False)
    if bf16:
        for module in model.modules():
            if (
                isinstance(module, Linear)
                and module is not model.output
                and module.weight is not None
            ):
                module.weight = torch.nn.Parameter(
                    module.weight.detach().to(torch.bfloat16), requires_grad=False
                )


def answer_loss(
    model: Transformer,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    bf16: bool,
    segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the learned positions only (the head runs on those alone)."""
    autocast = (
        torch.autocast(tokens.device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    with autocast:
        hidden = model.hidden_states(tokens, segments=segments)
        keep = labels != IGNORE
        logits = model.output(hidden[keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum"), int(keep.sum())


def answer_loss_fn(*, bf16: bool) -> LossFn:
    """The SFT objective: next-token loss on the learned positions."""
    return lambda model, tokens, labels, segments=None: answer_loss(
        model, tokens, labels, bf16=bf16, segments=segments
    )


@torch.no_grad()
def evaluate(
    model: Transformer,
    examples: Sequence[Example],
    pad_id: int,
    *,
    batch_size: int,
    loss_fn: LossFn,
) -> float:
    """Mean loss per learned token on `examples`."""
    total, count = 0.0, 0
    device = model.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for start in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[start : start + batch_size]]
        loss, n = loss_fn(model, *_batch_tensors(batch, pad_id, device))
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def _batch_tensors(
    batch: Sequence[Example], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    tokens, labels = collate(batch, pad_id)
    segments = segment_ids(batch)
    return tokens.to(device), labels.to(device), None if segments is None else segments.to(device)


def settings_key(config: Any, lora: LoraConfig | None, data_checksum: str) -> str:
    """What must match for a checkpoint to be resumed: settings (a dataclass such as
    `TrainConfig`), adapter shape (None: every weight is trained) and data."""
    blob = json.dumps(
        {
            "train": asdict(config),
            "lora": None if lora is None else lora.to_dict(),
            "data": data_checksum,
        }
        | ({"full": True} if lora is None else {}),
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def finished_checkpoint(run_dir: Path, key: str, steps: int) -> bool:
    """Whether `run_dir` holds the last checkpoint of a run with settings `key`."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return False
    state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    return state["settings_key"] == key and int(state["step"]) >= steps


def save_checkpoint(path: Path, state: dict[str, object]) -> None:
    """`torch.save` to a temporary name, renamed into place (a kill leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_adapter(
    model: Transformer,
    adapter: LoraAdapter,
    train: Sequence[Example],
    run_dir: str | Path,
    config: TrainConfig,
    *,
    pad_id: int,
    data_checksum: str,
    eval_examples: Sequence[Example] = (),
    on_step: Callable[[StepReport], None] | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train `adapter` (in place) on `train`; resumes from `run_dir`'s checkpoint if it has one.

    The objective is `loss_fn` (default: the SFT answer loss). Training runs where `model` lives
    (CPU or GPU); the adapter's tensors are back on the CPU when it returns.
    """
    params = adapter.parameters()
    for p in params:
        p.data = p.data.to(model.device)
    freeze_base(model, bf16=config.bf16)
    adapter.attach(model)
    copies = dense_copies(model, torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    with copies:
        result = train_parameters(
            model,
            params,
            train,
            run_dir,
            config,
            pad_id=pad_id,
            key=settings_key(config, adapter.config, data_checksum),
            eval_examples=eval_examples,
            on_step=on_step,
            loss_fn=loss_fn,
        )
    for p in params:
        p.data = p.data.cpu()
    return result


def train_full(
    model: Transformer,
    train: Sequence[Example],
    run_dir: str | Path,
    config: TrainConfig,
    *,
    pad_id: int,
    data_checksum: str,
    eval_examples: Sequence[Example] = (),
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Full fine-tuning: every weight of a dense `model` trains (float32 weights, bf16
    autocast with `config.bf16`); resumable like `train_adapter`."""
    if is_compressed(model):
        raise ValueError(
            "a compressed model cannot be fine-tuned in full: train a LoRA adapter on it, or"
            " fine-tune its dense base (--model)"
        )
    return train_parameters(
        model,
        list(model.parameters()),
        train,
        run_dir,
        config,
        pad_id=pad_id,
        key=settings_key(config, None, data_checksum),
        eval_examples=eval_examples,
        on_step=on_step,
    )


def train_parameters(
    model: Transformer,
    params: Sequence[torch.nn.Parameter],
    train: Sequence[Example],
    run_dir: str | Path,
    config: TrainConfig,
    *,
    pad_id: int,
    key: str,
    eval_examples: Sequence[Example] = (),
    on_step: Callable[[StepReport], None] | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """The SFT loop over `params` (the rest of `model` stays as it is); resumes from `run_dir`'s
    checkpoint when its settings `key` matches, and refuses one that does not."""
    loss_fn = loss_fn or answer_loss_fn(bf16=config.bf16)
    if not train:
        raise ValueError("no training examples (all were empty or longer than --seq-len)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = model.device
    for p in params:
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_at)
    step, last_loss, eval_loss = 0, float("nan"), None
    checkpoint_path = run_dir / CHECKPOINT
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True, map_location="cpu")
        if state["settings_key"] != key:
            raise ResumeError(
                f"{run_dir} holds a checkpoint of a run with other settings or data;"
                " use another run directory, or --restart to discard it"
            )
        with torch.no_grad():
            for p, saved in zip(params, state["adapter"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, last_loss = int(state["step"]), float(state["loss"])
        eval_loss = state.get("eval_loss")
    cut_log(run_dir / METRICS, lambda r: r.get("step", 0) <= step)
    resumed_from = step

    micro_per_epoch = math.ceil(len(train) / config.batch_size)
    order_epoch, order = -1, []
    tokens_seen, start = 0, time.perf_counter()
    with (run_dir / METRICS).open("a") as metrics:
        while step < config.steps:
            batches = []
            for micro in range(step * config.grad_accum, (step + 1) * config.grad_accum):
                epoch, index = divmod(micro, micro_per_epoch)
                if epoch != order_epoch:
                    order = epoch_batches(train, config.batch_size, seed=config.seed, epoch=epoch)
                    order_epoch = epoch
                batches.append([train[i] for i in order[index]])
            n_learned = sum(e.n_learned for batch in batches for e in batch)
            t0 = time.perf_counter()
            total = 0.0
            for batch in batches:
                loss, _ = loss_fn(model, *_batch_tensors(batch, pad_id, device))
                (loss / max(n_learned, 1)).backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = total / max(n_learned, 1)
            n_tokens = sum(len(e.ids) for batch in batches for e in batch)
            tokens_seen += n_tokens
            report = StepReport(
                step,
                config.steps,
                last_loss,
                scheduler.get_last_lr()[0],
                n_tokens / (time.perf_counter() - t0),
            )
            if eval_examples and (step % config.eval_every == 0 or step == config.steps):
                model.eval()
                eval_loss = evaluate(
                    model, eval_examples, pad_id, batch_size=config.batch_size, loss_fn=loss_fn
                )
                model.train()
                report.eval_loss = eval_loss
            metrics.write(json.dumps(asdict(report)) + "\n")
            metrics.flush()
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(
                    checkpoint_path,
                    {
                        "settings_key": key,
                        "adapter": [p.detach().clone() for p in params],
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                        "loss": last_loss,
                        "eval_loss": eval_loss,
                    },
                )
            if on_step is not None:
                on_step(report)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return TrainResult(
        steps=step,
        final_loss=last_loss,
        eval_loss=eval_loss,
        tokens=tokens_seen,
        seconds=time.perf_counter() - start,
        resumed_from=resumed_from,
        peak_rss_mb=_peak_rss_mb(),
    )
