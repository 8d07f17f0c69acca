"""RLHF on a LoRA policy: K sampled responses per prompt, rewards penalised by the KL to the
reference policy, leave-one-out advantages, then μ ≥ 2 updates per rollout batch with MDPO's KL
trust region (MDLOO) or PPO's clipped ratio (RLOO), on the identical schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from openafm.adapters import LoraAdapter
from openafm.model import Transformer
from openafm.posttrain.losses import (
    kl_penalized_reward,
    leave_one_out_advantage,
    mdpo_loss,
    rloo_clipped_loss,
    sequence_logprob,
)
from openafm.runtime import Engine, SamplingParams
from openafm.tokenizer import Tokenizer

Reward = Callable[[int, list[int], str], float]
"""reward(prompt index, response token ids, response text) -> a number."""

ALGORITHMS = ("mdloo", "rloo")


@dataclass(frozen=True)
class RLConfig:
    """One algorithm's settings; the arms of a comparison differ only in `algo`."""

    algo: str = "mdloo"
    k: int = 4  # responses per prompt
    updates: int = 2  # μ: gradient steps per rollout batch
    beta: float = 0.05  # weight of the KL to the reference in the reward
    step_size: float = 1.0  # MDPO's t: the KL to the rollout policy weighs 1/t
    clip: float = 0.2  # RLOO's ratio clip
    lr: float = 1e-3
    max_tokens: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {', '.join(ALGORITHMS)}, got {self.algo!r}")
        if self.k < 2:
            raise ValueError(
                f"a leave-one-out method needs k >= 2 responses per prompt, got {self.k}"
            )
        if self.updates < 1:
            raise ValueError("updates must be at least 1")


@dataclass
class Rollout:
    """Sequences (prompt + response, right-padded), which targets are response tokens, and the
    rollout and reference policies' log-probabilities of each response."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    old_logits: torch.Tensor
    old_logprob: torch.Tensor
    reference_logprob: torch.Tensor
    lengths: list[int]


class PolicyTrainer:
    """Trains `adapter` (attached to `model`) against `reward`; the reference is the adapter
    as it was when training began."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        adapter: LoraAdapter,
        reward: Reward,
        config: RLConfig,
        *,
        seed: int = 0,
    ) -> None:
        self.model, self.adapter, self.reward, self.config = model, adapter, reward, config
        self.reference = adapter.to(torch.float32)
        self.engine = Engine(model, tokenizer, tune_threads=False)
        self.optimizer = torch.optim.Adam(adapter.parameters(), lr=config.lr)
        self.seed = seed
        self.iteration = 0
        adapter.attach(model)

    def _logits(self, rollout_inputs: torch.Tensor) -> torch.Tensor:
        return self.model(rollout_inputs).float()

    def rollout(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        """K responses per prompt from the current policy, scored and with their log-probs."""
        k = self.config.k
        asked = [list(p) for p in prompts for _ in range(k)]
        params = SamplingParams(
            max_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
            seed=self.seed * 100_003 + self.iteration,
        )
        with torch.no_grad():
            done = self.engine.generate(asked, params)
        rewards = torch.tensor(
            [self.reward(i // k, c.token_ids, c.text) for i, c in enumerate(done)]
        )
        pad = self.engine.tokenizer.eos_id or 0
        sequences = [p + c.token_ids for p, c in zip(asked, done, strict=True)]
        width = max(len(s) for s in sequences) - 1
        inputs = torch.full((len(sequences), width), pad)
        targets = torch.full((len(sequences), width), pad)
        mask = torch.zeros(len(sequences), width)
        for row, (prompt, seq) in enumerate(zip(asked, sequences, strict=True)):
            inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
            targets[row, : len(seq) - 1] = torch.tensor(seq[1:])
            mask[row, len(prompt) - 1 : len(seq) - 1] = 1.0
        with torch.no_grad():
            old_logits = self._logits(inputs)
            self.reference.attach(self.model)
            reference = sequence_logprob(self._logits(inputs), targets, mask)
            self.adapter.attach(self.model)
        return Rollout(
            inputs,
            targets,
            mask,
            rewards,
            old_logits,
            sequence_logprob(old_logits, targets, mask),
            reference,
            [len(c.token_ids) for c in done],
        )

    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """One iteration: a rollout batch, then `updates` gradient steps on it."""
        return self.update(self.rollout(prompts))

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """Leave-one-out advantages of the KL-penalised rewards, per response."""
        config = self.config
        shaped = kl_penalized_reward(
            rollout.rewards, rollout.old_logprob, rollout.reference_logprob, config.beta
        )
        return leave_one_out_advantage(shaped.view(-1, config.k)).view(-1)

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`updates` gradient steps of the configured algorithm on one rollout batch."""
        config = self.config
        advantages = self.advantages(rollout)
        stats: dict[str, float] = {}
        for _ in range(config.updates):
            logits = self._logits(rollout.inputs)
            if config.algo == "mdloo":
                loss, stats = mdpo_loss(
                    logits,
                    rollout.old_logits,
                    rollout.targets,
                    rollout.mask,
                    advantages,
                    config.step_size,
                )
            else:
                logprob = sequence_logprob(logits, rollout.targets, rollout.mask)
                loss = rloo_clipped_loss(logprob, rollout.old_logprob, advantages, config.clip)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.iteration += 1
        lengths = torch.tensor(rollout.lengths, dtype=torch.float32)
        return {
            "iteration": float(self.iteration),
            "reward": float(rollout.rewards.mean()),
            "kl_to_reference": float((rollout.old_logprob - rollout.reference_logprob).mean()),
            "kl_to_old": stats.get("kl_to_old", float("nan")),
            "length": float(lengths.mean()),
            "empty_rate": float((lengths == 0).float().mean()),
            "loss": float(loss.detach()),
        }
