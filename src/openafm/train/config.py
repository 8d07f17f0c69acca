"""`TrainConfig`: everything a pre-training run needs besides its data, and named presets.

A config is a preset name or a JSON/TOML file of fields (a file may start from a preset with
`preset = "NAME"`); command-line options override single fields.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from openafm.model import ModelConfig, get_preset

Optimizer = Literal["adamw", "rmsprop-momentum"]
Precision = Literal["bf16", "fp32"]
DistillMode = Literal["top1", "kl"]


class TrainConfigError(ValueError):
    """A config that cannot describe a run (unknown field, bad value)."""


@dataclass(frozen=True)
class TrainConfig:
    """A pre-training run: model preset, batch geometry, optimizer, schedule, cadence."""

    model: str = "afm-tiny"  # a ModelConfig preset
    vocab_size: int = 0  # 0: the preset's; text data sets it to fit the tokenizer
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 0  # sequences per forward on one rank (0: the whole share, no accumulation)
    steps: int = 1000
    optimizer: Optimizer = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient norm; 0 disables
    z_loss: float = 1e-4  # weight of log²(Σ exp logits); 0 disables
    precision: Precision = "bf16"  # bf16 autocast over float32 master weights, or fp32
    activation_checkpointing: bool = False
    val_fraction: float = 0.02  # held-out share of the data's windows
    eval_every: int = 100
    eval_batches: int = 4  # held-out batches (of batch_size sequences) per evaluation
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    teacher: str = ""  # a model to distil from (name or path); empty: plain pre-training
    distill_mode: DistillMode = "top1"
    teacher_weight: float = 0.9

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "steps", "eval_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 0:
            raise TrainConfigError(
                f"vocab_size must be 0 (the preset's) or positive, got {self.vocab_size}"
            )
        if self.micro_batch < 0 or self.keep_checkpoints < 1 or self.warmup_steps < 0:
            raise TrainConfigError("micro_batch ≥ 0, keep_checkpoints ≥ 1, warmup_steps ≥ 0")
        if not 0 <= self.val_fraction < 1:
            raise TrainConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.optimizer not in ("adamw", "rmsprop-momentum"):
            raise TrainConfigError(f"unknown optimizer {self.optimizer!r}: adamw, rmsprop-momentum")
        if self.precision not in ("bf16", "fp32"):
            raise TrainConfigError(f"unknown precision {self.precision!r}: bf16 or fp32")
        try:
            get_preset(self.model)
        except KeyError as exc:
            raise TrainConfigError(exc.args[0]) from None

    @property
    def model_config(self) -> ModelConfig:
        preset = get_preset(self.model)
        if self.vocab_size:
            return dataclasses.replace(preset, vocab_size=self.vocab_size)
        return preset

    def fit_tokenizer(self, tokenizer_vocab: int) -> TrainConfig:
        """For text read with a tokenizer of `tokenizer_vocab` tokens: a preset whose vocabulary
        is smaller grows to it (padded to a multiple of 64, which tensor parallelism can split)."""
        if tokenizer_vocab <= self.model_config.vocab_size:
            return self
        return dataclasses.replace(self, vocab_size=-(-tokenizer_vocab // 64) * 64)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` (None values are ignored: options the user did not give)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS: dict[str, TrainConfig] = {
    # unit tests: the 0.1M-parameter `tiny` model on a byte tokenizer
    "tiny": TrainConfig(
        model="tiny",
        seq_len=32,
        batch_size=8,
        steps=40,
        lr=1e-2,
        warmup_steps=4,
        eval_every=10,
        eval_batches=2,
        checkpoint_every=10,
    ),
    # the CPU demonstration: an 18.9M-parameter model, 8 x 256 tokens per step
    "afm-tiny": TrainConfig(
        model="afm-tiny",
        seq_len=256,
        batch_size=8,
        steps=2000,
        lr=3e-3,
        warmup_steps=100,
        eval_every=100,
        eval_batches=4,
        checkpoint_every=100,
    ),
    # one-GPU benchmark: about 1B parameters, 8 x 2048 tokens per step
    "afm-1b": TrainConfig(
        model="afm-1b",
        seq_len=2048,
        batch_size=8,
        steps=50,
        lr=3e-4,
        warmup_steps=10,
        eval_every=1000,
        checkpoint_every=1000,
    ),
}


def load_train_config(name_or_file: str) -> TrainConfig:
    """A preset by name, or a `.json` / `.toml` file of `TrainConfig` fields."""
    if name_or_file in PRESETS:
        return PRESETS[name_or_file]
    path = Path(name_or_file)
    if not path.is_file():
        raise TrainConfigError(
            f"{name_or_file!r} is neither a training preset ({', '.join(PRESETS)}) nor a file"
        )
    text = path.read_text()
    try:
        fields = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise TrainConfigError(f"{path}: not valid {path.suffix[1:] or 'JSON'}: {exc}") from None
    preset = fields.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise TrainConfigError(f"{path}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TrainConfigError(f"{path}: unknown fields {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base, **fields)
