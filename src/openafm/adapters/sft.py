"""One adapter training run, end to end: data → fresh or initialised adapter → train → save.

The saved `adapter.json` records what is needed to trust and repeat the run: the base's
signature, the training data's checksum, every setting, the command line, and the losses.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from openafm.adapters.adapter_file import check_base, load_adapter, save_adapter
from openafm.adapters.lora import AdapterError, LoraAdapter, LoraConfig
from openafm.adapters.sft_data import (
    Example,
    SftDataError,
    conversations_checksum,
    pack,
    tokenize_all,
)
from openafm.adapters.trainer import (
    CHECKPOINT,
    StepReport,
    TrainConfig,
    TrainResult,
    finished_checkpoint,
    settings_key,
    train_adapter,
    train_full,
)
from openafm.files import write_json_atomic
from openafm.io import write_hf
from openafm.model import Transformer
from openafm.tokenizer import Tokenizer

log = logging.getLogger("openafm")
Conversation = Sequence[dict[str, str]]


@dataclass(frozen=True)
class SftRun:
    """Where an adapter run reads and writes, and the choices that are not optimiser settings."""

    name: str
    out_dir: Path
    run_dir: Path
    seq_len: int = 512
    pack: bool = False  # several conversations per row of seq_len, each attending to itself
    epochs: float | None = None  # when set, overrides TrainConfig.steps
    init_from: Path | None = None
    restart: bool = False
    overwrite: bool = False


def steps_for_epochs(epochs: float, n_examples: int, config: TrainConfig) -> int:
    batches = math.ceil(n_examples / config.batch_size)
    return max(1, math.ceil(epochs * batches / config.grad_accum))


def initial_adapter(
    run: SftRun, model: Transformer, lora: LoraConfig, signature: str, seed: int
) -> LoraAdapter:
    """A fresh adapter, or a copy of `run.init_from` (e.g. the accuracy-recovery adapter)."""
    if run.init_from is None:
        return LoraAdapter.fresh(run.name, model, lora, seed=seed)
    source = load_adapter(run.init_from)
    check_base(source, signature)
    source.check_fits(model)
    adapter = source.to(torch.float32)
    adapter.name = run.name
    adapter.metadata = {"init_from": source.name}
    for p in adapter.parameters():
        p.requires_grad_(True)
    return adapter


@dataclass
class _Prepared:
    """A run's tokenized data and its settings, once `--epochs` is turned into steps."""

    train: list[Example]
    held_out: list[Example]
    config: TrainConfig
    run_key: str  # the data as the checkpoint must match it
    pad_id: int
    facts: dict[str, object]  # what the saved metadata records about the data


def _prepare(
    tokenizer: Tokenizer,
    conversations: Sequence[Conversation],
    eval_conversations: Sequence[Conversation],
    run: SftRun,
    config: TrainConfig,
) -> _Prepared:
    maybe_rerun = (run.run_dir / CHECKPOINT).exists() and not run.restart
    if run.out_dir.exists() and not run.overwrite and not maybe_rerun:
        raise _exists(run)
    train, too_long = tokenize_all(tokenizer, conversations, run.seq_len)
    if not train:
        raise SftDataError(f"every training example is longer than --seq-len {run.seq_len}")
    if too_long:
        log.warning("left out %d examples longer than %d tokens", too_long, run.seq_len)
    held_out, _ = tokenize_all(tokenizer, eval_conversations, run.seq_len)
    conversation_count = len(train)
    checksum = conversations_checksum(conversations)
    run_key = checksum
    if run.pack:
        train = pack(train, run.seq_len)
        run_key = f"{checksum}:packed to {run.seq_len}"
        log.info("packed %d conversations into %d rows", conversation_count, len(train))
    if run.epochs is not None:
        config = replace(config, steps=steps_for_epochs(run.epochs, len(train), config))
    facts = {
        "data_checksum": checksum,
        "examples": conversation_count,
        "packed_rows": len(train) if run.pack else None,
        "examples_too_long": too_long,
        "eval_examples": len(held_out),
        "seq_len": run.seq_len,
    }
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return _Prepared(train, held_out, config, run_key, pad_id, facts)


def _exists(run: SftRun) -> AdapterError:
    return AdapterError(f"{run.out_dir} already exists; pass --overwrite to replace it")


def _claim_out(run: SftRun, prepared: _Prepared, lora: LoraConfig | None) -> None:
    """Refuse an existing `run.out_dir` unless it is this run's own result: a rerun of the
    command that wrote it (killed after saving, before it ended) finds its finished checkpoint
    and writes the same result again. Then `--restart` discards the run directory."""
    if run.out_dir.exists() and not run.overwrite:
        key = settings_key(prepared.config, lora, prepared.run_key)
        if run.restart or not finished_checkpoint(run.run_dir, key, prepared.config.steps):
            raise _exists(run)
        log.info("%s was written by this run; writing it again", run.out_dir)
    if run.restart and run.run_dir.exists():
        shutil.rmtree(run.run_dir)


def _training_record(
    prepared: _Prepared, result: TrainResult, provenance: dict[str, object] | None
) -> dict[str, object]:
    return {
        **(provenance or {}),
        **prepared.facts,
        "settings": asdict(prepared.config),
        "final_loss": round(result.final_loss, 4),
        "eval_loss": None if result.eval_loss is None else round(result.eval_loss, 4),
        "tokens": result.tokens,
        "seconds": round(result.seconds, 1),
    }


def run_sft(
    model: Transformer,
    tokenizer: Tokenizer,
    signature: str,
    conversations: Sequence[Conversation],
    run: SftRun,
    lora: LoraConfig,
    config: TrainConfig,
    *,
    eval_conversations: Sequence[Conversation] = (),
    provenance: dict[str, object] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> tuple[LoraAdapter, TrainResult]:
    """Train adapter `run.name` on `conversations` and save it to `run.out_dir`.

    `signature` is the base's (computed before training casts its weights); `provenance`
    (data file, command line, …) is stored in `adapter.json` under "training".
    """
    prepared = _prepare(tokenizer, conversations, eval_conversations, run, config)
    adapter = initial_adapter(run, model, lora, signature, prepared.config.seed)
    _claim_out(run, prepared, adapter.config)
    if on_start is not None:
        on_start(prepared.config.steps)
    result = train_adapter(
        model,
        adapter,
        prepared.train,
        run.run_dir,
        prepared.config,
        pad_id=prepared.pad_id,
        data_checksum=prepared.run_key,
        eval_examples=prepared.held_out,
        on_step=on_step,
    )
    adapter.metadata = {
        **adapter.metadata,
        "base_signature": signature,
        "training": _training_record(prepared, result, provenance),
    }
    save_adapter(adapter, run.out_dir)
    return adapter, result


def run_full_sft(
    model: Transformer,
    tokenizer: Tokenizer,
    signature: str,
    conversations: Sequence[Conversation],
    run: SftRun,
    config: TrainConfig,
    *,
    eval_conversations: Sequence[Conversation] = (),
    provenance: dict[str, object] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Fine-tune every weight of `model` on `conversations`; `run.out_dir` becomes a model
    directory (`config.json`, `model.safetensors`, the tokenizer, `training.json`) that
    `--model` loads. `signature` is the starting base's, recorded in `training.json`."""
    prepared = _prepare(tokenizer, conversations, eval_conversations, run, config)
    _claim_out(run, prepared, None)
    result = train_full(
        model,
        prepared.train,
        run.run_dir,
        prepared.config,
        pad_id=prepared.pad_id,
        data_checksum=prepared.run_key,
        eval_examples=prepared.held_out,
        on_step=on_step,
    )
    record = {
        "name": run.name,
        "base_signature": signature,
        "training": _training_record(prepared, result, provenance),
    }
    write_hf(run.out_dir, model.config, model.state_dict(), extra_config={"openafm_trained": True})
    tokenizer.save(run.out_dir)
    write_json_atomic(run.out_dir / "training.json", record)
    return result
