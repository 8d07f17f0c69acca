"""Training and judging the reward model.

The backbone is the frozen base: the heads train on its last-token hidden states, computed once
(and cached in the run directory chunk by chunk, so a killed run resumes). That makes k-fold
cross-validation of the losses (plain Bradley-Terry, soft labels, grades) cheap on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from openafm.adapters import AdapterError, LoraAdapter, load_adapter, save_adapter
from openafm.adapters.adapter_file import replace_dir
from openafm.adapters.trainer import save_checkpoint
from openafm.model import Transformer
from openafm.posttrain.losses import grading_loss, soft_ranking_loss
from openafm.posttrain.preferences import Messages, PreferencePair
from openafm.posttrain.reward_model import RewardModel
from openafm.tokenizer import Tokenizer

HEADS_FILE = "heads.safetensors"
ADAPTER_DIR = "adapter"
META_FILE = "reward_model.json"


class RewardModelError(ValueError):
    """A reward model directory is missing, malformed or made for another base."""


@dataclass(frozen=True)
class RewardTrainConfig:
    """How a reward model is trained; `soft_labels=False` is plain Bradley-Terry (p = 1)."""

    soft_labels: bool = True
    default_p: float = 0.85  # p of pairs given without a strength level, with soft labels
    grade_weight: float = 1.0
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 < self.default_p <= 1.0:
            raise ValueError("default_p must be in (0.5, 1]")
        if self.steps < 1 or self.batch_size < 1 or self.max_tokens < 8:
            raise ValueError("steps and batch_size must be at least 1, max_tokens at least 8")


def answer_ids(tokenizer: Tokenizer, prompt: Messages, answer: str, max_tokens: int) -> list[int]:
    """The chat rendering of prompt + answer, keeping the last `max_tokens` ids (the answer's
    end is what the reward head reads)."""
    messages = [{"role": r, "content": c} for r, c in prompt]
    messages.append({"role": "assistant", "content": answer})
    text = tokenizer.render_chat(messages, add_generation_prompt=False)
    return tokenizer.encode(text, add_bos=False)[-max_tokens:]


def padded(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(tokens, lengths)`."""
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq)
    return tokens, torch.tensor([len(s) for s in sequences])


@torch.no_grad()
def last_hidden_states(
    model: Transformer,
    sequences: Sequence[Sequence[int]],
    *,
    pad: int = 0,
    batch_size: int = 8,
    cache_dir: Path | None = None,
    chunk: int = 256,
    on_done: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The final hidden state at each sequence's last token (N, dim), float32; bf16 autocast on
    a CPU. With `cache_dir`, finished chunks are stored and reused."""
    out = []
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if model.device.type == "cpu"
        else contextlib.nullcontext()
    )
    for start in range(0, len(sequences), chunk):
        part = sequences[start : start + chunk]
        stored = cache_dir / f"{start:08d}.pt" if cache_dir is not None else None
        if stored is not None and stored.exists():
            out.append(torch.load(stored, weights_only=True))
            if on_done is not None:
                on_done(len(part))
            continue
        features = torch.empty(len(part), model.config.dim)
        order = sorted(range(len(part)), key=lambda i: len(part[i]))
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            tokens, lengths = padded([part[i] for i in rows], pad)
            with autocast:
                hidden = model.hidden_states(tokens.to(model.device))
            features[rows] = hidden[torch.arange(len(rows)), lengths - 1].float().cpu()
            if on_done is not None:
                on_done(len(rows))
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(stored, features)
        out.append(features)
    return torch.cat(out) if out else torch.empty(0, model.config.dim)


@dataclass(frozen=True)
class PairFeatures:
    """Last-token hidden states of both answers of each pair, and the pair's labels."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    p: torch.Tensor
    chosen_grades: torch.Tensor
    rejected_grades: torch.Tensor

    def subset(self, index: Sequence[int]) -> PairFeatures:
        rows = torch.tensor(list(index), dtype=torch.long)
        return PairFeatures(*(getattr(self, f.name)[rows] for f in fields(self)))

    def __len__(self) -> int:
        return self.chosen.shape[0]


def pair_labels(
    pairs: Sequence[PreferencePair], config: RewardTrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p per pair (1 for plain BT; the strength's p, else `default_p`, for soft labels) and
    the grades of both answers."""
    if config.soft_labels:
        p = [pair.p if pair.p < 1.0 else config.default_p for pair in pairs]
    else:
        p = [1.0] * len(pairs)
    return (
        torch.tensor(p),
        torch.tensor([pair.chosen_grades for pair in pairs]),
        torch.tensor([pair.rejected_grades for pair in pairs]),
    )


def train_heads(
    model: RewardModel, features: PairFeatures, config: RewardTrainConfig
) -> dict[str, float]:
    """Fit the reward and grading heads on fixed features (the backbone is not touched)."""
    heads = [*model.reward_head.parameters(), *model.grade_heads.parameters()]
    optimizer = torch.optim.AdamW(heads, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    n = len(features)
    loss = torch.tensor(0.0)
    for _ in range(config.steps):
        rows = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        r_c, g_c = model.heads(features.chosen[rows])
        r_r, g_r = model.heads(features.rejected[rows])
        ranking = soft_ranking_loss(r_c, r_r, features.p[rows])
        grading = grading_loss(
            torch.cat([g_c, g_r]),
            torch.cat([features.chosen_grades[rows], features.rejected_grades[rows]]),
        )
        loss = ranking + config.grade_weight * grading
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"final_loss": float(loss.detach())}


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, features: PairFeatures) -> float:
    """Share of pairs whose preferred answer gets the higher reward (ties count half)."""
    r_c, _ = model.heads(features.chosen)
    r_r, _ = model.heads(features.rejected)
    return float(((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean())


def length_accuracy(chosen: Sequence[int], rejected: Sequence[int], longer_wins: bool) -> float:
    """Accuracy of the length-only judge (the longer, or the shorter, answer wins)."""
    scores = []
    for c, r in zip(chosen, rejected, strict=True):
        if c == r:
            scores.append(0.5)
        else:
            scores.append(float((c > r) == longer_wins))
    return sum(scores) / max(len(scores), 1)


def folds(n: int, k: int, seed: int) -> list[list[int]]:
    """k disjoint folds of range(n), shuffled with `seed`."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i::k] for i in range(k)]


def cross_validate(
    backbone: Transformer,
    features: PairFeatures,
    pairs: Sequence[PreferencePair],
    configs: dict[str, RewardTrainConfig],
    answer_lengths: tuple[Sequence[int], Sequence[int]],
    *,
    k: int = 5,
    balanced: Sequence[bool] | None = None,
) -> dict[str, dict[str, object]]:
    """Held-out pairwise accuracy per fold of each named config's heads, and of the length
    judge (its direction fitted on the training folds); with `balanced`, also on the pairs it
    marks (answers of similar length)."""
    chosen_len, rejected_len = answer_lengths
    results: dict[str, dict[str, list[float]]] = {}
    for fold, held in enumerate(folds(len(features), k, seed=0)):
        held_set = set(held)
        train = [i for i in range(len(features)) if i not in held_set]
        marked = [i for i in held if balanced is not None and balanced[i]]
        for name, config in configs.items():
            p, g_c, g_r = pair_labels(pairs, config)
            labelled = PairFeatures(features.chosen, features.rejected, p, g_c, g_r)
            torch.manual_seed(config.seed + fold)
            model = RewardModel(backbone)
            train_heads(model, labelled.subset(train), config)
            row = results.setdefault(name, {"accuracy": [], "balanced_accuracy": []})
            row["accuracy"].append(pairwise_accuracy(model, labelled.subset(held)))
            if marked:
                row["balanced_accuracy"].append(pairwise_accuracy(model, labelled.subset(marked)))
        longer = length_accuracy(
            [chosen_len[i] for i in train], [rejected_len[i] for i in train], True
        )
        direction = longer >= 0.5
        row = results.setdefault("length_only", {"accuracy": [], "balanced_accuracy": []})
        row["accuracy"].append(
            length_accuracy(
                [chosen_len[i] for i in held], [rejected_len[i] for i in held], direction
            )
        )
        if marked:
            row["balanced_accuracy"].append(
                length_accuracy(
                    [chosen_len[i] for i in marked], [rejected_len[i] for i in marked], direction
                )
            )
    return {name: _summary(values) for name, values in results.items()}


def _summary(values: dict[str, list[float]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, per_fold in values.items():
        if not per_fold:
            continue
        mean = sum(per_fold) / len(per_fold)
        spread = math.sqrt(sum((v - mean) ** 2 for v in per_fold) / max(len(per_fold) - 1, 1))
        out[key] = round(mean, 4)
        out[f"{key}_fold_sd"] = round(spread, 4)
        out[f"{key}_folds"] = [round(v, 4) for v in per_fold]
    return out


def save_reward_model(
    model: RewardModel,
    directory: Path,
    meta: dict[str, object],
    adapter: LoraAdapter | None = None,
) -> None:
    """The heads (safetensors), `reward_model.json` and the backbone's LoRA adapter if it has
    one (`adapter/`), written to a temporary directory and renamed into place."""
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("backbone.")
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        save_file(state, str(tmp / HEADS_FILE))
        if adapter is not None:
            signed = {**adapter.metadata, "base_signature": meta["base_signature"]}
            save_adapter(replace(adapter, metadata=signed), tmp / ADAPTER_DIR)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_reward_model(
    directory: Path, backbone: Transformer, signature: str, tokenizer: Tokenizer
) -> RewardModel:
    """A saved reward model on `backbone` (its LoRA adapter attached, if it has one); refused
    when it was trained on another base or another tokenizer."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise RewardModelError(f"{directory}: no {META_FILE}; not a reward model directory")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise RewardModelError(f"{meta_path}: not valid JSON ({error.msg})") from None
    if meta.get("base_signature") != signature:
        raise RewardModelError(
            f"{directory} was trained on another base model (signature"
            f" {str(meta.get('base_signature'))[:12]}…, this base is {signature[:12]}…)"
        )
    if meta.get("tokenizer") != tokenizer.fingerprint():
        raise RewardModelError(f"{directory} was trained with another tokenizer")
    model = RewardModel(
        backbone,
        grade_hidden=int(meta.get("grade_hidden", 256)),
        max_tokens=int(meta.get("max_tokens", 512)),
    )
    try:
        state = load_file(str(directory / HEADS_FILE))
    except Exception as error:  # safetensors raises its own error types
        raise RewardModelError(f"{directory / HEADS_FILE}: cannot be read ({error})") from None
    missing = model.load_state_dict(state, strict=False).missing_keys
    if [k for k in missing if not k.startswith("backbone.")]:
        raise RewardModelError(f"{directory / HEADS_FILE} lacks some head weights")
    if (directory / ADAPTER_DIR).exists():
        try:
            adapter = load_adapter(directory / ADAPTER_DIR)
        except AdapterError as error:
            raise RewardModelError(f"{directory}: {error}") from None
        adapter.attach(backbone)
    return model


@torch.no_grad()
def score_answers(
    model: RewardModel,
    tokenizer: Tokenizer,
    prompts: Sequence[Messages],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
) -> tuple[list[float], list[list[int]]]:
    """The reward of each (prompt, answer) and its predicted grade level per head, each
    sequence cut to the window the model was trained on."""
    sequences = [
        answer_ids(tokenizer, p, a, model.max_tokens) for p, a in zip(prompts, answers, strict=True)
    ]
    pad = tokenizer.eos_id or 0
    features = last_hidden_states(model.backbone, sequences, pad=pad, batch_size=batch_size)
    rewards, grades = model.heads(features)
    return rewards.tolist(), grades.argmax(dim=-1).tolist()


def length_balanced(
    chosen: Sequence[int], rejected: Sequence[int], ratio: float = 1.2
) -> list[bool]:
    """Pairs whose answers' lengths are within `ratio` of each other."""
    return [max(c, r) <= ratio * max(min(c, r), 1) for c, r in zip(chosen, rejected, strict=True)]


def fit_reward_model(
    backbone: Transformer,
    tokenizer: Tokenizer,
    pairs: Sequence[PreferencePair],
    config: RewardTrainConfig,
    run_dir: Path,
    *,
    cv_folds: int = 0,
    on_features: Callable[[int], None] | None = None,
) -> tuple[RewardModel, dict[str, object]]:
    """Features of every answer (cached in `run_dir`), optionally k-fold held-out accuracy of
    this config against plain Bradley-Terry and the length-only judge, then heads fitted on
    all pairs. Returns the model and the report."""
    if cv_folds == 1 or cv_folds < 0:
        raise ValueError("cross-validation needs at least 2 folds (or 0 for none)")
    pad = tokenizer.eos_id or 0
    sequences = []
    for pair in pairs:
        sequences.append(answer_ids(tokenizer, pair.prompt, pair.chosen, config.max_tokens))
        sequences.append(answer_ids(tokenizer, pair.prompt, pair.rejected, config.max_tokens))
    states = last_hidden_states(
        backbone, sequences, pad=pad, cache_dir=run_dir / "features", on_done=on_features
    )
    p, g_c, g_r = pair_labels(pairs, config)
    features = PairFeatures(states[0::2], states[1::2], p, g_c, g_r)
    report: dict[str, object] = {"pairs": len(pairs), "settings": config.__dict__.copy()}
    if cv_folds:
        lengths = (
            [len(tokenizer.encode(pair.chosen)) for pair in pairs],
            [len(tokenizer.encode(pair.rejected)) for pair in pairs],
        )
        plain = RewardTrainConfig(**{**config.__dict__, "soft_labels": False, "grade_weight": 0.0})
        configs = {"this": config, "plain_bradley_terry": plain}
        report["cross_validation"] = cross_validate(
            backbone,
            features,
            pairs,
            configs,
            lengths,
            k=cv_folds,
            balanced=length_balanced(*lengths),
        )
        report["length_balanced_pairs"] = sum(length_balanced(*lengths))
    torch.manual_seed(config.seed)
    model = RewardModel(backbone, max_tokens=config.max_tokens)
    report |= train_heads(model, features, config)
    report["training_accuracy"] = round(pairwise_accuracy(model, features), 4)
    return model, report
