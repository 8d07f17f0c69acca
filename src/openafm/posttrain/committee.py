"""Rejection sampling from a teacher committee (iTeC, arXiv 2407.21075 §5.1): every member (the
base, the SFT adapter, the best RL adapter, …) answers each prompt K times; a judge (the reward
model, or a verifiable reward) picks the best answer per prompt; the winners become SFT data.

Members are adapters on one base, so one continuous batch serves them all, row by row. Samples
are appended to a JSONL store one prompt at a time, so a killed run resumes where it stopped and
draws the same samples (each answer's seed depends only on the run's seed and its place).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from openafm.runtime import Engine, SamplingParams
from openafm.runtime.batches import generate_continuously

BASE = "base"


@dataclass(frozen=True)
class Member:
    """A committee member: a label and the adapter it runs with (None: the base alone)."""

    name: str
    adapter: str | None

    @classmethod
    def parse(cls, text: str) -> Member:
        """'base', 'ADAPTER' or 'LABEL=ADAPTER'."""
        label, _, adapter = text.partition("=")
        if not adapter:
            label, adapter = text, text
        if not label:
            raise ValueError(f"committee member {text!r} has no name")
        return cls(label, None if adapter == BASE else adapter)


@dataclass(frozen=True)
class Candidate:
    """One sampled answer: to which prompt, by which member, and whether it ended on its own
    (False: cut at the token cap)."""

    prompt: int
    member: str
    sample: int
    text: str
    tokens: int
    finished: bool


def _seed(seed: int, prompt: int, member: int, sample: int) -> int:
    return (((seed * 1_000_003 + prompt) * 101 + member) * 1_009 + sample) % (2**63)


def _stored(store: Path, members: Sequence[Member], k: int) -> dict[int, list[Candidate]]:
    """Complete prompts already in the store (a torn last line is ignored)."""
    if not store.exists():
        return {}
    groups: dict[int, list[Candidate]] = {}
    lines = store.read_text().splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        candidate = Candidate(**row)
        groups.setdefault(candidate.prompt, []).append(candidate)
    names = {m.name for m in members}
    return {
        p: g
        for p, g in groups.items()
        if len(g) == k * len(members) and {c.member for c in g} == names
    }


def sample_committee(
    engine: Engine,
    prompts: Sequence[str],
    members: Sequence[Member],
    k: int,
    *,
    max_tokens: int = 256,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    max_batch: int = 16,
    store: Path | None = None,
    on_prompt: Callable[[int], None] | None = None,
) -> list[list[Candidate]]:
    """K answers per member to each chat prompt, grouped per prompt in prompt order;
    `on_prompt(n)` as prompts complete (including n already in the store)."""
    if k < 1 or not members:
        raise ValueError("a committee needs at least one member and k >= 1")
    if len({m.name for m in members}) != len(members):
        raise ValueError("committee members need distinct names")
    done = _stored(store, members, k) if store is not None else {}
    if on_prompt is not None and done:
        on_prompt(len(done))
    ids = {i: engine.encode(p) for i, p in enumerate(prompts) if i not in done}
    requests, places = [], []
    for i, prompt_ids in ids.items():
        for m, member in enumerate(members):
            for s in range(k):
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=_seed(seed, i, m, s),
                )
                requests.append((prompt_ids, params, member.adapter))
                places.append((i, member.name, s))
    pending: dict[int, list[Candidate]] = {}
    per_prompt = k * len(members)
    out = store.open("a") if store is not None else None

    def finished(index: int, completion: object) -> None:
        prompt, member, sample = places[index]
        candidate = Candidate(
            prompt,
            member,
            sample,
            completion.text,  # type: ignore[attr-defined]
            len(completion.token_ids),  # type: ignore[attr-defined]
            completion.finish_reason == "stop",  # type: ignore[attr-defined]
        )
        group = pending.setdefault(prompt, [])
        group.append(candidate)
        if len(group) == per_prompt:
            group.sort(key=lambda c: ([m.name for m in members].index(c.member), c.sample))
            done[prompt] = group
            if out is not None:
                out.write("".join(json.dumps(asdict(c)) + "\n" for c in group))
                out.flush()
            if on_prompt is not None:
                on_prompt(1)

    try:
        if requests:
            generate_continuously(engine, requests, max_batch=max_batch, on_done=finished)
    finally:
        if out is not None:
            out.close()
    return [done[i] for i in range(len(prompts))]


Judge = Callable[[int, Candidate], float]
"""judge(prompt index, candidate) -> a score; higher is better."""


def pick_best(group: Sequence[Candidate], scores: Sequence[float]) -> int | None:
    """Index of the best-scored answer that ended on its own (None: every answer was cut)."""
    finished = [i for i, c in enumerate(group) if c.finished]
    if not finished:
        return None
    return max(finished, key=lambda i: (scores[i], -group[i].tokens))


def best_of_n_report(
    groups: Sequence[Sequence[Candidate]],
    judge_scores: Sequence[Sequence[float]],
    oracle_scores: Sequence[Sequence[float]],
    *,
    seed: int = 0,
) -> dict[str, object]:
    """How often the judge's pick fully passes the oracle (e.g. all constraints met), against a
    random pick and the oracle's own best (the committee's ceiling); also per member."""
    rng = random.Random(seed)
    picked, oracle, randomly, mean_pick, mean_all = 0, 0, 0.0, 0.0, 0.0
    per_member: dict[str, list[float]] = {}
    for group, judged, truth in zip(groups, judge_scores, oracle_scores, strict=True):
        best = pick_best(group, judged)
        choice = best if best is not None else rng.randrange(len(group))
        picked += truth[choice] >= 1.0
        mean_pick += truth[choice]
        oracle += max(truth) >= 1.0
        randomly += sum(t >= 1.0 for t in truth) / len(truth)
        mean_all += sum(truth) / len(truth)
        for candidate, value in zip(group, truth, strict=True):
            per_member.setdefault(candidate.member, []).append(value)
    n = max(len(groups), 1)
    return {
        "prompts": len(groups),
        "judge_best_pass_rate": picked / n,
        "random_pass_rate": randomly / n,
        "oracle_best_pass_rate": oracle / n,
        "judge_best_mean_reward": mean_pick / n,
        "random_mean_reward": mean_all / n,
        "member_pass_rate": {
            name: sum(v >= 1.0 for v in values) / len(values) for name, values in per_member.items()
        },
        "member_mean_reward": {
            name: sum(values) / len(values) for name, values in per_member.items()
        },
    }


def winner_conversations(
    prompts: Sequence[str],
    groups: Sequence[Sequence[Candidate]],
    scores: Sequence[Sequence[float]],
    *,
    min_score: float = float("-inf"),
) -> list[list[dict[str, str]]]:
    """Chat SFT examples from each prompt's best answer; prompts whose answers were all cut,
    or whose best scores under `min_score`, are left out."""
    conversations = []
    for prompt, group, judged in zip(prompts, groups, scores, strict=True):
        best = pick_best(group, judged)
        if best is not None and judged[best] >= min_score:
            conversations.append(
                [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": group[best].text},
                ]
            )
    return conversations


def strength_of(gap: float) -> str:
    """Preference strength from the gap in the share of constraints met."""
    if gap >= 2 / 3:
        return "significantly_better"
    if gap >= 1 / 2:
        return "better"
    if gap >= 1 / 3:
        return "slightly_better"
    return "negligibly_better"


def answer_grades(reward: float, candidate: Candidate, min_words: int = 8) -> dict[str, int]:
    """Grades computed from an answer: instruction following (0 none, 1 some, 2 all
    constraints met) and verbosity (0 too short, 1 fine, 2 ran to the token cap)."""
    following = 2 if reward >= 1.0 else (1 if reward > 0 else 0)
    short = len(candidate.text.split()) < min_words
    verbosity = 2 if not candidate.finished else (0 if short else 1)
    return {"instruction_following": following, "verbosity": verbosity}


def constraint_pairs(
    prompts: Sequence[str],
    groups: Sequence[Sequence[Candidate]],
    rewards: Sequence[Sequence[float]],
) -> list[dict[str, object]]:
    """Preference records from each prompt's samples: its best against its worst answer where
    they meet different shares of the constraints, the strength set by the gap, and both
    answers' computed grades."""
    records = []
    for prompt, group, scores in zip(prompts, groups, rewards, strict=True):
        best = max(range(len(group)), key=lambda i: scores[i])
        worst = min(range(len(group)), key=lambda i: scores[i])
        gap = scores[best] - scores[worst]
        if gap <= 0:
            continue
        records.append(
            {
                "prompt": prompt,
                "chosen": group[best].text,
                "rejected": group[worst].text,
                "strength": strength_of(gap),
                "chosen_grades": answer_grades(scores[best], group[best]),
                "rejected_grades": answer_grades(scores[worst], group[worst]),
            }
        )
    return records
