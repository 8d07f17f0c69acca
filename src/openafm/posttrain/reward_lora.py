"""A reward model whose backbone learns too: a LoRA adapter on the base and the heads, trained
end to end on preference pairs (soft-label ranking loss + λ·grading loss), resumable.

The frozen-backbone model of `reward_training` reads one fixed hidden state; here the base's
projections adapt, at the price of a forward and backward pass of both answers per pair.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from openafm.adapters import LoraAdapter, LoraConfig
from openafm.adapters.trainer import ResumeError, freeze_base, save_checkpoint, settings_key
from openafm.model import Transformer
from openafm.posttrain.preferences import PreferencePair
from openafm.posttrain.reward_model import PairBatch, RewardModel, reward_model_loss
from openafm.posttrain.reward_training import (
    PairFeatures,
    RewardTrainConfig,
    answer_ids,
    last_hidden_states,
    padded,
    pair_labels,
    pairwise_accuracy,
)
from openafm.tokenizer import Tokenizer

CHECKPOINT = "checkpoint.pt"


def _labels_checksum(
    sequences: Sequence[Sequence[int]], labels: tuple[torch.Tensor, ...], holdout: int
) -> str:
    """Identifies the tokenized pairs, their labels (p and grades) and the held-out split."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(json.dumps(list(seq)).encode())
    h.update(json.dumps([label.tolist() for label in labels] + [holdout]).encode())
    return h.hexdigest()


def _batch(
    sequences: Sequence[Sequence[int]],
    rows: Sequence[int],
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pad: int,
) -> PairBatch:
    chosen, chosen_lengths = padded([sequences[2 * i] for i in rows], pad)
    rejected, rejected_lengths = padded([sequences[2 * i + 1] for i in rows], pad)
    index = torch.tensor(list(rows))
    p, g_c, g_r = labels
    return PairBatch(
        chosen, chosen_lengths, rejected, rejected_lengths, p[index], g_c[index], g_r[index]
    )


def train_lora_reward_model(
    backbone: Transformer,
    tokenizer: Tokenizer,
    pairs: Sequence[PreferencePair],
    config: RewardTrainConfig,
    run_dir: Path,
    *,
    lora: LoraConfig,
    holdout: int = 0,
    checkpoint_every: int = 10,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[RewardModel, LoraAdapter, dict[str, object]]:
    """Train a LoRA adapter on `backbone` and the heads on all but the last `holdout` pairs.

    Each step draws `config.batch_size` pairs (the draw depends only on the seed and the step,
    so a run resumed from `run_dir`'s checkpoint continues exactly). Returns the model (the
    adapter attached to `backbone`, whose projections are now bf16), the adapter and a report
    with the held-out pairwise accuracy.
    """
    if not 0 <= holdout < len(pairs):
        raise ValueError(f"--holdout must leave training pairs: {holdout} of {len(pairs)}")
    pad = tokenizer.eos_id or 0
    sequences = [
        answer_ids(tokenizer, pair.prompt, answer, config.max_tokens)
        for pair in pairs
        for answer in (pair.chosen, pair.rejected)
    ]
    labels = pair_labels(pairs, config)
    n_train = len(pairs) - holdout

    adapter = LoraAdapter.fresh("reward", backbone, lora, seed=config.seed)
    key = settings_key(config, adapter.config, _labels_checksum(sequences, labels, holdout))
    torch.manual_seed(config.seed)
    model = RewardModel(backbone, max_tokens=config.max_tokens)
    freeze_base(backbone, bf16=True)
    adapter.attach(backbone)
    heads = [*model.reward_head.parameters(), *model.grade_heads.parameters()]
    params = [*adapter.parameters(), *heads]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT
    step, loss_value = 0, math.nan
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state["settings_key"] != key:
            raise ResumeError(
                f"{run_dir} holds a checkpoint of a reward model with other settings or data;"
                " use another --run-dir, or delete it to start over"
            )
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        step, loss_value = int(state["step"]), float(state["loss"])
    resumed_from = step

    backbone.train()
    while step < config.steps:
        rng = random.Random(f"{config.seed}:{step}")
        rows = [rng.randrange(n_train) for _ in range(min(config.batch_size, n_train))]
        with torch.autocast(backbone.device.type, dtype=torch.bfloat16):
            loss, _ = reward_model_loss(
                model, _batch(sequences, rows, labels, pad), config.grade_weight
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step, loss_value = step + 1, float(loss.detach())
        if step % checkpoint_every == 0 or step == config.steps:
            save_checkpoint(
                checkpoint,
                {
                    "settings_key": key,
                    "params": [p.detach().clone() for p in params],
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "loss": loss_value,
                },
            )
        if on_step is not None:
            on_step(step, loss_value)
    backbone.eval()
    for p in params:
        p.requires_grad_(False)

    report: dict[str, object] = {
        "pairs": len(pairs),
        "backbone": f"LoRA rank {lora.rank}",
        "settings": asdict(config),
        "final_loss": round(loss_value, 4),
        "resumed_from": resumed_from,
    }
    if holdout:
        held = range(n_train, len(pairs))
        states = last_hidden_states(
            backbone, [sequences[2 * i + k] for i in held for k in (0, 1)], pad=pad
        )
        index = torch.tensor(list(held))
        features = PairFeatures(states[0::2], states[1::2], *(label[index] for label in labels))
        report["holdout_pairs"] = holdout
        report["holdout_accuracy"] = round(pairwise_accuracy(model, features), 4)
    return model, adapter, report
