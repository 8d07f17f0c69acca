"""The accuracy-recovery adapter: LoRA on the frozen compressed model, distilled from the original.

The student is the compressed model with a fresh LoRA adapter; the teacher is the uncompressed
model. The loss at every position is the KL divergence from the teacher's next-token
distribution (optionally mixed with the next-token loss on the text), so the adapter learns to
undo what compression changed. Training reuses the adapter trainer (checkpoints, resume,
warmup + cosine, clipping, progress), so a killed run continues where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from openafm.adapters.lora import LoraAdapter, LoraConfig, detach
from openafm.adapters.sft_data import IGNORE, Example
from openafm.adapters.trainer import (
    LossFn,
    StepReport,
    TrainConfig,
    TrainResult,
    freeze_base,
    train_adapter,
)
from openafm.files import read_jsonl
from openafm.model import Transformer
from openafm.tokenizer import Tokenizer


class RecoveryDataError(ValueError):
    """Recovery training text that cannot be used."""


@dataclass(frozen=True)
class RecoveryConfig:
    """What the recovery adapter is and what it learns from (optimiser settings: TrainConfig)."""

    rank: int = 16
    alpha: float = 32.0
    seq_len: int = 256
    kl_weight: float = 1.0
    next_token_weight: float = 0.0

    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha)


def distillation_loss(
    teacher: Transformer, *, kl_weight: float = 1.0, next_token_weight: float = 0.0
) -> LossFn:
    """Summed `kl_weight·KL(teacher ‖ student) + next_token_weight·CE` over learned positions."""

    def loss(
        student: Transformer,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        segments: torch.Tensor | None = None,
    ):
        keep = labels != IGNORE
        autocast = torch.autocast(tokens.device.type, dtype=torch.bfloat16)
        with torch.no_grad(), autocast:
            hidden = teacher.hidden_states(tokens, segments=segments)[keep]
            target = F.log_softmax(teacher.output(hidden).float(), -1)
        with autocast:
            logits = student.output(student.hidden_states(tokens, segments=segments)[keep]).float()
        logp = F.log_softmax(logits, dim=-1)
        total = kl_weight * F.kl_div(logp, target, log_target=True, reduction="sum")
        if next_token_weight:
            total = total + next_token_weight * F.cross_entropy(
                logits, labels[keep], reduction="sum"
            )
        return total, int(keep.sum())

    return loss


def read_texts(path: str | Path) -> Iterator[str]:
    """Training texts of a file: a plain-text file whole, or each JSON/JSONL record's text.

    A record's text is its `text` field, its chat `messages`, its instruction and output
    (Alpaca), or else every one of its string fields of more than a few words (an article, an
    e-mail, a dialogue with its summaries). A `.json` file holds a list of records.
    """
    path = Path(path)
    if not path.is_file():
        raise RecoveryDataError(f"recovery text not found: {path}")
    if path.suffix not in (".json", ".jsonl"):
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    if path.suffix == ".json":
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise RecoveryDataError(f"{path}: expected a JSON list of records")
        rows = enumerate(records, 1)
    else:
        rows = read_jsonl(path)
    for where, record in rows:
        text = _record_text(record)
        if text is None:
            raise RecoveryDataError(f"{path}:{where}: a record holds no text")
        yield text


def _record_text(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("messages"), list):
        return "\n\n".join(str(m.get("content", "")) for m in record["messages"])
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        return f"{record['instruction']}\n\n{record['output']}"
    fields = [v for v in record.values() if isinstance(v, str) and len(v.split()) > 3]
    return "\n\n".join(fields) or None


def token_windows(
    tokenizer: Tokenizer, paths: Sequence[str | Path], seq_len: int
) -> tuple[list[Example], str]:
    """Every file's texts, joined by end-of-text tokens, cut into windows; and their checksum."""
    separator = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids: list[int] = []
    for path in paths:
        for text in read_texts(path):
            ids.extend(tokenizer.encode(text, add_bos=False))
            ids.extend(separator)
    if len(ids) < seq_len:
        raise RecoveryDataError(f"{len(ids)} tokens of recovery text, fewer than one window")
    learn = (True,) * seq_len
    windows = [
        Example(tuple(ids[i : i + seq_len]), learn)
        for i in range(0, len(ids) - seq_len + 1, seq_len)
    ]
    checksum = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return windows, checksum


def train_recovery(
    student: Transformer,
    teacher: Transformer,
    train: Sequence[Example],
    run_dir: str | Path,
    recovery: RecoveryConfig,
    config: TrainConfig,
    *,
    pad_id: int,
    data_checksum: str,
    eval_examples: Sequence[Example] = (),
    name: str = "recovery",
    init: LoraAdapter | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> tuple[LoraAdapter, TrainResult]:
    """Distil `teacher` into `student` (compressed, frozen) through a new LoRA adapter.

    The teacher runs from a bf16 copy of its projections (cast once; `teacher` is unchanged);
    the trainer runs the student from bf16 copies of its compressed weights.
    """
    teacher = copy.deepcopy(teacher)
    freeze_base(teacher, bf16=True)
    adapter = init or LoraAdapter.fresh(name, student, recovery.lora(), seed=config.seed)
    settings = hashlib.sha256(
        json.dumps([data_checksum, asdict(recovery)], sort_keys=True).encode()
    ).hexdigest()
    loss_fn = distillation_loss(
        teacher, kl_weight=recovery.kl_weight, next_token_weight=recovery.next_token_weight
    )
    result = train_adapter(
        student,
        adapter,
        train,
        run_dir,
        config,
        pad_id=pad_id,
        data_checksum=settings,
        eval_examples=eval_examples,
        on_step=on_step,
        loss_fn=loss_fn,
    )
    return adapter, result


def run_recovery(
    student: Transformer,
    teacher: Transformer,
    tokenizer: Tokenizer,
    data: Sequence[str | Path],
    run_dir: str | Path,
    recovery: RecoveryConfig,
    config: TrainConfig,
    *,
    holdout: int,
    provenance: dict[str, object],
    device: str | torch.device = "cpu",
    on_step: Callable[[StepReport], None] | None = None,
) -> tuple[LoraAdapter, TrainResult]:
    """Train the recovery adapter of `student` on the texts of `data`, on `device`.

    The last `holdout` windows are held out for the KLD curve. Both models move to `device`.
    The adapter comes back on the CPU with its training record (`provenance` added to it).
    """
    windows, checksum = token_windows(tokenizer, data, recovery.seq_len)
    if holdout >= len(windows):
        raise RecoveryDataError(f"holding out {holdout} windows leaves none of {len(windows)}")
    train, held = windows[: len(windows) - holdout], windows[len(windows) - holdout :]
    detach(student)
    student.to(device)
    teacher.to(device)
    adapter, result = train_recovery(
        student,
        teacher,
        train,
        run_dir,
        recovery,
        config,
        pad_id=tokenizer.eos_id or 0,
        data_checksum=checksum,
        eval_examples=held,
        on_step=on_step,
    )
    adapter.metadata = {
        "role": "accuracy-recovery",
        "training": {
            **provenance,
            "data": [Path(p).name for p in data],
            "data_checksum": checksum,
            "windows": len(train),
            "held_out_windows": len(held),
            "recovery": asdict(recovery),
            "settings": asdict(config),
            "device": str(device),
            "final_kld": round(result.final_loss, 5),
            "held_out_kld": None if result.eval_loss is None else round(result.eval_loss, 5),
            "tokens": result.tokens,
            "seconds": round(result.seconds, 1),
        },
    }
    return adapter, result
