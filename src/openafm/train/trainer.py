"""The pre-training loop: one step, written once, for one process or any mesh of processes.

`train()` builds the model of a `TrainConfig`, applies the mesh's plans (tensor parallel,
context parallel, activation checkpointing, FSDP), and runs optimizer steps of
`batch_size * seq_len` tokens (gradient accumulation when a rank's share exceeds
`micro_batch`), with evaluation on the held-out windows, checkpoints, metrics and, at the end,
the weights exported in the Hugging Face layout into the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from openafm.files import write_json_atomic
from openafm.io import write_hf
from openafm.model import Transformer
from openafm.tokenizer import Tokenizer
from openafm.train.checkpoint import Checkpointer
from openafm.train.config import TrainConfig
from openafm.train.context_parallel import apply_context_parallel, shard_sequence
from openafm.train.data import BatchOrder, DataError, held_out_batches, load_windows
from openafm.train.distill import distillation_loss
from openafm.train.launch import threads_per_rank
from openafm.train.mesh import MESH_DIMS, MeshSpec, build_mesh, data_parallel_rank
from openafm.train.metrics import (
    MetricsLog,
    cpu_has_bf16_units,
    flops_per_token,
    machine_matmul_peak,
)
from openafm.train.optim import RMSPropMomentum
from openafm.train.parallel import apply_fsdp, apply_tensor_parallel

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"


@dataclass
class RunSummary:
    """What a finished (or resumed-and-finished) run reports."""

    run_dir: Path
    steps: int
    resumed_from: int
    final_loss: float
    val_loss: float | None
    tokens_per_s: float  # median over the steps run in this invocation
    mfu: float
    peak_flops: float
    parameters: int
    world_size: int
    mesh: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine to `lr · min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or the seed's RMSProp with momentum; matrices decay, norms and vectors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (config.beta1, config.beta2)
    if config.optimizer == "rmsprop-momentum":
        return RMSPropMomentum(groups, lr=config.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=1e-8)


def choose_device(name: str) -> torch.device:
    """`auto` is this process's GPU when PyTorch sees one (`LOCAL_RANK` picks it), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no GPU")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> bool:
    """Join the process group (torchrun's environment), or make a one-process group.

    Returns whether this call created it (and so should destroy it)."""
    if dist.is_initialized():
        return False
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        # DTensor's hint to flatten a 2-D mesh for the gradient norm, printed once per rank
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if device.type == "cpu" and local > 1:  # processes on one machine share its cores
            torch.set_num_threads(threads_per_rank(local))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


@dataclass
class _Run:
    """The parts of a run the step and evaluation share."""

    config: TrainConfig
    model: Transformer
    teacher: Transformer | None
    cp: Any  # the cp sub-mesh, or None
    device: torch.device

    def losses(self, ids: torch.Tensor, *, train: bool = True) -> dict[str, torch.Tensor]:
        """`objective` (what the step minimises: the loss, plus z-loss when training), `loss`
        (next-token cross-entropy, or the distillation loss when a teacher is set) and `lm_loss`
        (next-token cross-entropy) of the windows `ids`."""
        c = self.config
        inputs, labels = ids[:, :-1], ids[:, 1:]
        if self.cp is not None:
            inputs, labels = shard_sequence(inputs, self.cp), shard_sequence(labels, self.cp)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=c.precision == "bf16"):
            logits = self.model(inputs)
            teacher_logits = None
            if train and self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(inputs)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss = ce
        if teacher_logits is not None:
            loss = distillation_loss(
                logits, teacher_logits, labels, mode=c.distill_mode, teacher_weight=c.teacher_weight
            )
        objective = loss
        if train and c.z_loss:
            objective = loss + c.z_loss * logits.logsumexp(dim=-1).pow(2).mean()
        return {"objective": objective, "loss": loss.detach(), "lm_loss": ce.detach()}

    def step(
        self, rows: torch.Tensor, layout: BatchLayout, optimizer: torch.optim.Optimizer
    ) -> dict[str, float]:
        """One optimizer step on this rank's `rows` (accumulated over micro-batches); the
        losses averaged over every rank, and the global gradient norm before clipping."""
        totals = {name: torch.zeros((), device=self.device) for name in ("loss", "lm_loss")}
        n = layout.accumulation
        for m in range(n):
            if n > 1:  # FSDP reduces gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(m == n - 1)  # type: ignore[operator]
            losses = self.losses(rows[m * layout.micro : (m + 1) * layout.micro])
            (losses["objective"] / n).backward()
            for name in totals:
                totals[name] += losses[name] / n
        limit = self.config.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {name: _mean_over_ranks(t) for name, t in totals.items()} | {
            "grad_norm": float(norm)
        }


@dataclass(frozen=True)
class BatchLayout:
    """How a step's global batch splits: this rank's data-parallel position, its micro-batches."""

    dp_rank: int
    dp_size: int
    micro: int
    accumulation: int

    @classmethod
    def of(cls, config: TrainConfig, mesh: DeviceMesh, spec: MeshSpec) -> BatchLayout:
        dp_rank, dp_size = data_parallel_rank(mesh)
        if config.batch_size % dp_size:
            raise DataError(
                f"batch_size {config.batch_size} is not divisible by the {dp_size} data-parallel"
                f" ranks of mesh {spec.text()}"
            )
        share = config.batch_size // dp_size
        micro = config.micro_batch or share
        if share % micro:
            raise DataError(
                f"a rank's {share} sequences do not split into micro-batches of {micro}"
            )
        return cls(dp_rank, dp_size, micro, share // micro)


def build_model(config: TrainConfig, mesh: DeviceMesh, device: torch.device) -> Transformer:
    """The freshly initialised model with the mesh's plans applied (TP, CP, checkpointing, FSDP)."""
    mc, cp, tp = config.model_config, mesh["cp"].size(), mesh["tp"].size()
    if config.seq_len > mc.max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_seq_len {mc.max_seq_len}"
        )
    if config.seq_len % cp:
        raise ValueError(f"seq_len {config.seq_len} is not divisible by cp={cp}")
    if cp > 1 and config.activation_checkpointing:
        raise ValueError("activation checkpointing with context parallelism is not supported yet")
    torch.manual_seed(config.seed)
    model = Transformer(mc)
    model.init_weights(seed=config.seed)
    model.to(device)
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if cp > 1:
        apply_context_parallel(model, mesh["cp"])
    if config.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for layer in model.layers:
            checkpoint(layer)
    return apply_fsdp(model, mesh)


def _prepare_teacher(
    teacher: Transformer, config: TrainConfig, mesh: DeviceMesh, device: torch.device
) -> Transformer:
    """The teacher on the device, frozen, attending across the `cp` ranks like the student."""
    if teacher.config.vocab_size != config.model_config.vocab_size:
        raise ValueError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the"
            f" student's ({config.model_config.vocab_size}): they must share a tokenizer"
        )
    teacher.to(device).eval().requires_grad_(False)
    if mesh["cp"].size() > 1:
        apply_context_parallel(teacher, mesh["cp"])
    return teacher


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().to(torch.float64).cpu()
    dist.all_reduce(value)
    return float(value.item()) / dist.get_world_size()


def train(
    config: TrainConfig,
    data: Sequence[str | Path],
    out: str | Path,
    *,
    mesh: MeshSpec | None = None,
    tokenizer: Tokenizer | None = None,
    teacher: Transformer | None = None,
    resume: bool = False,
    device: str = "auto",
    on_step: Callable[[dict[str, Any]], None] | None = None,
    save: bool = True,
) -> RunSummary:
    """Run (or resume) pre-training; every process of the group calls this.

    `save=False` (benchmarks) writes neither checkpoints nor the final weights."""
    dev = choose_device(device)
    owns_group = init_distributed(dev)
    try:
        return _train(
            config,
            data,
            Path(out),
            mesh or MeshSpec(),
            tokenizer,
            teacher,
            resume,
            dev,
            on_step,
            save,
        )
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(
    config: TrainConfig,
    data: Sequence[str | Path],
    out: Path,
    spec: MeshSpec,
    tokenizer: Tokenizer | None,
    teacher: Transformer | None,
    resume: bool,
    device: torch.device,
    on_step: Callable[[dict[str, Any]], None] | None,
    save: bool,
) -> RunSummary:
    # under bf16 autocast the norms see bf16 inputs and float32 weights; PyTorch says so per call
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    if config.precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_units():
        log.warning("this CPU has no bf16 units (emulated bf16 is slower): training in float32")
        config = dataclasses.replace(config, precision="fp32")
    reads_text = any(Path(path).is_file() for path in data)
    if tokenizer is not None and reads_text:
        fitted = config.fit_tokenizer(tokenizer.vocab_size)
        if fitted is not config and dist.get_rank() == 0:
            log.warning(
                "the %s preset's vocabulary of %d grows to %d to fit the tokenizer's %d tokens",
                config.model,
                config.model_config.vocab_size,
                fitted.vocab_size,
                tokenizer.vocab_size,
            )
        config = fitted
    world, rank, mc = dist.get_world_size(), dist.get_rank(), config.model_config
    mesh = build_mesh(spec, world, device.type)
    sizes = dict(zip(MESH_DIMS, mesh.shape, strict=True))
    layout = BatchLayout.of(config, mesh, spec)
    if rank == 0:
        what = "reading and tokenizing" if reads_text else "reading"
        log.info("%s the data (%s)…", what, ", ".join(Path(path).name for path in data))
    windows = load_windows(data, tokenizer, config.seq_len, mc.vocab_size, config.val_fraction)
    order = BatchOrder(windows, config.batch_size, config.seed)
    held_out = held_out_batches(
        windows, config.batch_size, config.eval_batches, layout.dp_rank, layout.dp_size
    )
    if (out / CONFIG_FILE).exists() and not resume:
        raise FileExistsError(f"{out} already holds a run: pass --resume, or choose a new --out")
    model = build_model(config, mesh, device)
    if teacher is not None:
        teacher = _prepare_teacher(teacher, config, mesh, device)
    dist.barrier()  # every rank has looked before rank 0 writes
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / CONFIG_FILE, config.to_dict())

    optimizer = build_optimizer(model, config)
    run = _Run(config, model, teacher, mesh["cp"] if sizes["cp"] > 1 else None, device)
    checkpointer = Checkpointer(out, config.keep_checkpoints, background=device.type == "cuda")
    metrics = MetricsLog(out, enabled=rank == 0)
    start = _restore(checkpointer, model, optimizer, windows.fingerprint()) if resume else 0
    metrics.truncate_after(start)

    peak = machine_matmul_peak(
        device, torch.bfloat16 if config.precision == "bf16" else torch.float32
    )
    per_token = flops_per_token(mc, config.seq_len)
    tokens_per_step = config.batch_size * config.seq_len
    meta = {"model_config": mc.to_dict(), "data": windows.fingerprint(), "mesh": sizes}
    speeds: list[float] = []
    record: dict[str, Any] = {}
    for step in range(start, config.steps):
        began = time.perf_counter()
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = order.rows(step, layout.dp_rank, layout.dp_size).to(device)
        losses = run.step(rows, layout, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        speeds.append(tokens_per_step / seconds)
        record = {"step": step + 1, **losses, "lr": lr}
        record |= {
            "tokens": (step + 1) * tokens_per_step,
            "epoch": order.epoch(step + 1),
            "step_time": seconds,
            "tokens_per_s": speeds[-1],
            "mfu": speeds[-1] * per_token / peak,
        }
        last = step + 1 == config.steps
        if held_out and ((step + 1) % config.eval_every == 0 or last):
            val_loss = evaluate(run, held_out)
            record |= {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        metrics.write(record)
        if on_step is not None and rank == 0:
            on_step(record)
        if save and ((step + 1) % config.checkpoint_every == 0 or last):
            checkpointer.save(step + 1, model, optimizer, meta)
            _hold_if_asked(step + 1, checkpointer)
    checkpointer.wait()
    if save and (start < config.steps or not (out / "model.safetensors").exists()):
        export_weights(model, out, tokenizer)
    median_speed = statistics.median(speeds) if speeds else 0.0
    return RunSummary(
        run_dir=out,
        steps=config.steps,
        resumed_from=start,
        final_loss=record.get("loss", math.nan),
        val_loss=record.get("val_loss"),
        tokens_per_s=median_speed,
        mfu=median_speed * per_token / peak,
        peak_flops=peak,
        parameters=mc.num_params(),
        world_size=world,
        mesh=sizes,
    )


HOLD_ENV = "OPENAFM_TRAIN_HOLD_AFTER"
"""For kill tests: after the checkpoint of this step is complete, wait (to be killed) instead of
going on, so a test kills the run at a point it chose rather than at a point it raced to."""


def _hold_if_asked(step: int, checkpointer: Checkpointer) -> None:
    if os.environ.get(HOLD_ENV) == str(step):
        checkpointer.wait()
        log.info("holding after the checkpoint of step %d (%s)", step, HOLD_ENV)
        parent = os.getppid()
        while os.getppid() == parent:  # a killed launcher must not leave its workers behind
            time.sleep(0.2)
        os._exit(1)


def _restore(
    checkpointer: Checkpointer,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    fingerprint: dict[str, int],
) -> int:
    """Load the newest intact checkpoint; the step it was taken after (0 without one)."""
    meta = checkpointer.load(model, optimizer, model.config.to_dict())
    if meta is None:
        log.warning("no checkpoint to resume from: starting at step 0")
        return 0
    if meta.get("data") != fingerprint:
        log.warning("the data differ from the checkpoint's (%s): the order will too", meta["data"])
    log.info("resumed from step %d", meta["step"])
    return int(meta["step"])


@torch.no_grad()
def evaluate(run: _Run, batches: Sequence[torch.Tensor]) -> float:
    """Mean next-token loss over the held-out batches, over all ranks."""
    total = torch.zeros((), device=run.device)
    for batch in batches:
        total += run.losses(batch.to(run.device), train=False)["lm_loss"]
    return _mean_over_ranks(total / len(batches))


def export_weights(model: Transformer, out: Path, tokenizer: Tokenizer | None) -> None:
    """The full weights, gathered from every shard, as `config.json` + `model.safetensors`
    (and the tokenizer) in `out`: loadable by `afm generate --model RUN_DIR` and transformers."""
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        write_hf(out, model.config, state, extra_config={"openafm_trained": True})
        if tokenizer is not None:
            tokenizer.save(out)
    dist.barrier()
