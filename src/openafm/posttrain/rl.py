"""RLHF on a LoRA policy: K sampled responses per prompt, rewards penalised by the KL to the
reference policy, leave-one-out advantages, then μ ≥ 2 updates per rollout batch with MDPO's KL
trust region (MDLOO) or PPO's clipped ratio (RLOO), on the identical schedule.

The model's head runs at the response positions only. For MDLOO the rollout policy's
log-probabilities over the whole vocabulary at those positions are kept from the rollout pass
(4 bytes per response token and vocabulary entry: about 1.6 GB for 32 answers of 256 tokens and a
49k vocabulary), so an update needs one forward per micro-batch, not two.

Rollout decode steps choose their thread count by timing (the engine's `ThreadTuner`): beside a
busy process a fixed count of all cores decodes 2-3x slower than one thread. The log-probability
passes and the updates keep PyTorch's setting for now: the tuner, once put on them, never probed
steps over a second long (since fixed), and its rerun benchmark is still to come
(docs/posttraining.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from openafm.adapters import LoraAdapter
from openafm.model import Transformer
from openafm.posttrain.losses import (
    kl_penalized_reward,
    leave_one_out_advantage,
    mdpo_loss,
    response_logprob,
    response_positions,
    rloo_clipped_loss,
)
from openafm.runtime import Completion, Engine, SamplingParams
from openafm.runtime.batches import generate_continuously
from openafm.tokenizer import Tokenizer

Reward = Callable[[int, Completion], float]
"""reward(prompt key, completion) -> a number."""

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
    max_grad_norm: float = 1.0
    max_tokens: int = 64
    temperature: float = 1.0
    micro_batch: int = 4  # rows per forward in an update
    max_batch: int = 32  # rows decoded together in a rollout
    bf16: bool = False  # autocast the updates' forwards to bfloat16 (CPU)

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {', '.join(ALGORITHMS)}, got {self.algo!r}")
        if self.k < 2:
            raise ValueError(
                f"a leave-one-out method needs k >= 2 responses per prompt, got {self.k}"
            )
        if self.updates < 1 or self.micro_batch < 1 or self.max_batch < 1:
            raise ValueError("updates, micro_batch and max_batch must be at least 1")


@dataclass
class Rollout:
    """Sequences (prompt + response, right-padded), which targets are response tokens, the
    rewards, the rollout and reference policies' log-probabilities of each response and, for
    MDLOO, the rollout policy's (N, V) log-probabilities at each micro-batch's response
    positions."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    old_logprob: torch.Tensor
    reference_logprob: torch.Tensor
    lengths: list[int]
    old_token_logp: list[torch.Tensor] | None = None


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PolicyTrainer:
    """Trains `adapter` (attached to `model`) against `reward`; the reference is `reference`,
    or the adapter as it was when training began.

    In a process group (data parallel, e.g. under torchrun), each rank samples its share of
    the prompts, the answers are gathered, each rank computes the gradient of its share of
    the micro-batches and the gradients are summed: one step equals the single-process step.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        adapter: LoraAdapter,
        reward: Reward,
        config: RLConfig,
        *,
        seed: int = 0,
        reference: LoraAdapter | None = None,
        tune_threads: bool = True,
    ) -> None:
        self.model, self.adapter, self.reward, self.config = model, adapter, reward, config
        self.reference = (reference or adapter).to(torch.float32)
        self.engine = Engine(model, tokenizer, tune_threads=tune_threads)
        self.optimizer = torch.optim.Adam(adapter.parameters(), lr=config.lr)
        self.seed = seed
        self.iteration = 0
        adapter.attach(model)

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.config.bf16:
            return torch.autocast(self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _response_logp(self, inputs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(N, V) log-probabilities of the attached policy at the N positions `keep` marks."""
        with self._autocast():
            logits = self.model.output(self.model.hidden_states(inputs)[keep])
        return torch.log_softmax(logits.float(), dim=-1)

    def _micro(self, n: int) -> list[slice]:
        step = self.config.micro_batch
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    @torch.no_grad()
    def _logprob(
        self,
        adapter: LoraAdapter,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        *,
        keep_tokens: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Each response's log-probability under `adapter` and, with `keep_tokens`, the (N, V)
        log-probabilities of each micro-batch."""
        adapter.attach(self.model)
        sums, kept = [], []
        try:
            for s in self._micro(inputs.shape[0]):
                keep, rows = response_positions(mask[s])
                logp = self._response_logp(inputs[s], keep)
                sums.append(response_logprob(logp, targets[s][keep], rows, inputs[s].shape[0]))
                if keep_tokens:
                    kept.append(logp)
            return torch.cat(sums), kept if keep_tokens else None
        finally:
            self.adapter.attach(self.model)

    def rollout(
        self, prompts: Sequence[Sequence[int]], keys: Sequence[int] | None = None
    ) -> Rollout:
        """K responses per prompt from the current policy, scored and with their log-probs;
        `keys[i]` names prompt i to the reward (default: i)."""
        k = self.config.k
        keys = list(range(len(prompts))) if keys is None else list(keys)
        asked = [list(p) for p in prompts for _ in range(k)]
        requests = [
            (
                ids,
                SamplingParams(
                    max_tokens=self.config.max_tokens,
                    temperature=self.config.temperature,
                    seed=(self.seed * 100_003 + self.iteration) * 10_007 + row,
                ),
                None,
            )
            for row, ids in enumerate(asked)
        ]
        rank, world = _rank_and_world()
        mine = [row for row in range(len(requests)) if (row // k) % world == rank]
        with torch.no_grad():
            answers = generate_continuously(
                self.engine, [requests[row] for row in mine], max_batch=self.config.max_batch
            )
        done = [None] * len(requests)
        shares: list[list[tuple[int, Completion]]] = [list(zip(mine, answers, strict=True))]
        if world > 1:
            shares = [[] for _ in range(world)]
            dist.all_gather_object(shares, list(zip(mine, answers, strict=True)))
        for share in shares:
            for row, completion in share:
                done[row] = completion
        rewards = torch.tensor([self.reward(keys[i // k], c) for i, c in enumerate(done)])
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
        old_logprob, old_token_logp = self._logprob(
            self.adapter, inputs, targets, mask, keep_tokens=self.config.algo == "mdloo"
        )
        return Rollout(
            inputs,
            targets,
            mask,
            rewards,
            old_logprob,
            self._logprob(self.reference, inputs, targets, mask)[0],
            [len(c.token_ids) for c in done],
            old_token_logp,
        )

    def step(
        self, prompts: Sequence[Sequence[int]], keys: Sequence[int] | None = None
    ) -> dict[str, float]:
        """One iteration: a rollout batch, then `updates` gradient steps on it."""
        return self.update(self.rollout(prompts, keys))

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """Leave-one-out advantages of the KL-penalised rewards, per response."""
        config = self.config
        shaped = kl_penalized_reward(
            rollout.rewards, rollout.old_logprob, rollout.reference_logprob, config.beta
        )
        return leave_one_out_advantage(shaped.view(-1, config.k)).view(-1)

    def _micro_loss(
        self, rollout: Rollout, index: int, rows: slice, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """The objective on micro-batch `index` (rows `rows`) as its share of the batch mean,
        and its responses' KL to the rollout policy summed."""
        inputs, targets = rollout.inputs[rows], rollout.targets[rows]
        n = inputs.shape[0]
        share = n / rollout.inputs.shape[0]
        keep, owner = response_positions(rollout.mask[rows])
        logp = self._response_logp(inputs, keep)
        tokens = targets[keep]
        if self.config.algo == "mdloo":
            if rollout.old_token_logp is None:
                raise ValueError("an MDLOO update needs the rollout policy's token log-probs")
            loss, stats = mdpo_loss(
                logp,
                rollout.old_token_logp[index],
                tokens,
                owner,
                advantages[rows],
                self.config.step_size,
            )
            return loss * share, stats["kl_to_old"] * n
        logprob = response_logprob(logp, tokens, owner, n)
        loss = rloo_clipped_loss(
            logprob, rollout.old_logprob[rows], advantages[rows], self.config.clip
        )
        return loss * share, float((rollout.old_logprob[rows] - logprob.detach()).sum())

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`updates` gradient steps of the configured algorithm on one rollout batch."""
        config = self.config
        advantages = self.advantages(rollout)
        n = rollout.inputs.shape[0]
        rank, world = _rank_and_world()
        totals = torch.zeros(2)
        skipped = 0
        for _ in range(config.updates):
            self.optimizer.zero_grad()
            totals = torch.zeros(2)  # the objective and the summed KL to the rollout policy
            for index, rows in list(enumerate(self._micro(n)))[rank::world]:
                loss, kl = self._micro_loss(rollout, index, rows, advantages)
                loss.backward()
                totals += torch.tensor([float(loss.detach()), kl])
            if world > 1:
                for p in self.adapter.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                dist.all_reduce(totals)
            norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), config.max_grad_norm)
            if not (torch.isfinite(norm) and torch.isfinite(totals[0])):
                skipped += 1  # an overflowing ratio: this step would make the policy NaN
                continue
            self.optimizer.step()
        total, kl_to_old = float(totals[0]), float(totals[1])
        self.iteration += 1
        lengths = torch.tensor(rollout.lengths, dtype=torch.float32)
        return {
            "iteration": float(self.iteration),
            "reward": float(rollout.rewards.mean()),
            "kl_to_reference": float((rollout.old_logprob - rollout.reference_logprob).mean()),
            "kl_to_old": kl_to_old / n,
            "length": float(lengths.mean()),
            "empty_rate": float((lengths == 0).float().mean()),
            "loss": total,
            "skipped_updates": float(skipped),
        }
