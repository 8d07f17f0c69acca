"""Synthetic constraint prompts for RL with a verifiable reward: base instructions (never
IFEval's own prompts; those sharing a word 13-gram with IFEval are dropped) with one to three
IFEval-style constraints attached, whose checkers score the answers."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from openafm.data.decontaminate import ngram_hashes
from openafm.eval import ifeval
from openafm.eval.ifeval import IFEvalPrompt

# constraints whose arguments depend on the prompt (repeat the request) are left out
EXCLUDED = frozenset({"combination:repeat_prompt"})


def decontaminated(
    instructions: Iterable[str], evaluation: Iterable[str], n: int = 13
) -> list[str]:
    """The instructions that share no word n-gram with any evaluation prompt."""
    seen: set[int] = set()
    for text in evaluation:
        seen |= ngram_hashes(text, n)
    return [text for text in instructions if not ngram_hashes(text, n) & seen]


def make_constraint_prompts(
    instructions: Sequence[str], count: int, *, seed: int = 0, most: int = 3
) -> list[IFEvalPrompt]:
    """`count` prompts (instructions reused in turn), each with 1 to `most` compatible
    constraints drawn with `seed`; keys count from 1."""
    if not instructions:
        raise ValueError("no base instructions to attach constraints to")
    ifeval.checkers()
    from lm_eval.tasks.ifeval import instructions_registry

    registry = instructions_registry.INSTRUCTION_DICT
    conflicts = instructions_registry.INSTRUCTION_CONFLICTS
    names = sorted(set(registry) - EXCLUDED)
    rng = random.Random(seed)
    prompts = []
    for key in range(1, count + 1):
        target = rng.randint(1, most)
        chosen: list[str] = []
        for name in rng.sample(names, len(names)):
            if len(chosen) == target:
                break
            if not any(
                name in conflicts.get(c, ()) or c in conflicts.get(name, ()) for c in chosen
            ):
                chosen.append(name)
        descriptions, kwargs = [], []
        for name in chosen:
            random.seed(rng.getrandbits(32))  # lm-eval draws its arguments from `random`
            checker = registry[name](name)
            descriptions.append(checker.build_description())
            args = checker.get_instruction_args() or {}
            kwargs.append({k: v for k, v in args.items() if v is not None})
        base = instructions[(key - 1) % len(instructions)].strip()
        prompt = f"{base} {' '.join(descriptions)}"
        prompts.append(IFEvalPrompt(key, prompt, tuple(chosen), tuple(kwargs)))
    return prompts


def constraint_reward(prompt: IFEvalPrompt, response: str) -> float:
    """The share of the prompt's constraints the response satisfies (strict checkers)."""
    verdict = ifeval.score(prompt, response)
    return sum(verdict.strict) / len(verdict.strict)
