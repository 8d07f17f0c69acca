"""Synthetic constraint prompts for RL with a verifiable reward: base instructions (never
IFEval's own prompts; those sharing a word 13-gram with IFEval are dropped) with one to three
IFEval-style constraints attached, whose checkers score the answers."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from openafm.data.decontaminate import ngram_hashes
from openafm.eval import ifeval
from openafm.eval.ifeval import IFEvalPrompt

REPEAT_REQUEST = "combination:repeat_prompt"
# never drawn: its argument is the prompt itself (`with_repeat_request` adds it)
EXCLUDED = frozenset({REPEAT_REQUEST})


def read_instructions(path: Path) -> list[str]:
    """Base instructions from self-instruct JSONL (instruction + the first instance's input)
    or an AlpacaEval JSON list ({instruction, ...}); duplicates dropped, order kept."""
    text = path.read_text()
    try:
        records = json.loads(text) if path.suffix == ".json" else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg})") from None
    if records is None:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: a line is not valid JSON ({error.msg})") from None
    out: list[str] = []
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise ValueError(f"{path}: every record needs an 'instruction' string")
        instruction = record["instruction"].strip()
        instances = record.get("instances") or [{}]
        given = instances[0].get("input", "") if isinstance(instances[0], dict) else ""
        out.append(f"{instruction}\n\n{given.strip()}" if given.strip() else instruction)
    if not out:
        raise ValueError(f"{path} holds no instructions")
    return list(dict.fromkeys(out))


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


def with_repeat_request(prompt: IFEvalPrompt) -> IFEvalPrompt:
    """The prompt with IFEval's "first repeat the request word for word" constraint added, the
    request being the whole prompt as it was (IFEval's layout: on a line of its own after it)."""
    ifeval.checkers()
    from lm_eval.tasks.ifeval import instructions_registry

    checker = instructions_registry.INSTRUCTION_DICT[REPEAT_REQUEST](REPEAT_REQUEST)
    description = checker.build_description(prompt_to_repeat=prompt.prompt)
    return IFEvalPrompt(
        prompt.key,
        f"{prompt.prompt}\n{description}",
        (*prompt.instruction_ids, REPEAT_REQUEST),
        (*prompt.kwargs, {"prompt_to_repeat": prompt.prompt}),
    )


def constraint_reward(prompt: IFEvalPrompt, response: str) -> float:
    """The share of the prompt's constraints the response satisfies (strict checkers)."""
    verdict = ifeval.score(prompt, response)
    return sum(verdict.strict) / len(verdict.strict)


def split_prompt_sets(
    instructions: Sequence[str],
    evaluation: Iterable[str],
    train_count: int,
    heldout_count: int,
    *,
    seed: int = 0,
    heldout_share: float = 0.25,
    max_chars: int = 600,
) -> tuple[list[IFEvalPrompt], list[IFEvalPrompt]]:
    """Training and held-out constraint prompts on disjoint base instructions (shorter than
    `max_chars`, decontaminated against `evaluation`), each with its own constraint draws."""
    usable = decontaminated([i for i in instructions if len(i) <= max_chars], evaluation)
    random.Random(seed).shuffle(usable)
    cut = int(len(usable) * (1 - heldout_share))
    if cut < 1 or cut == len(usable):
        raise ValueError(f"too few usable base instructions ({len(usable)}) to split")
    train = make_constraint_prompts(usable[:cut], train_count, seed=seed)
    heldout = make_constraint_prompts(usable[cut:], heldout_count, seed=seed + 1)
    return train, heldout


def prompt_record(prompt: IFEvalPrompt) -> dict[str, object]:
    """The prompt in IFEval's input_data.jsonl layout (so `afm eval ifeval` reads it)."""
    return {
        "key": prompt.key,
        "prompt": prompt.prompt,
        "instruction_id_list": list(prompt.instruction_ids),
        "kwargs": [dict(k) for k in prompt.kwargs],
    }


def caps_length(prompt: IFEvalPrompt) -> bool:
    """Whether a constraint of the prompt is an upper bound on length ("less than …")."""
    return any(kwargs.get("relation") == "less than" for kwargs in prompt.kwargs)


def guarded_reward(
    prompt: IFEvalPrompt,
    response: str,
    ended: bool,
    *,
    min_words: int = 8,
    no_end_penalty: float = 0.5,
) -> float:
    """The constraint reward with guards against hacking it: an answer under `min_words`
    words scores 0 unless a constraint caps length (an empty answer satisfies "no commas"),
    and an answer that never ends (cut at the token cap) loses `no_end_penalty`."""
    reward = constraint_reward(prompt, response)
    if len(response.split()) < min_words and not caps_length(prompt):
        reward = 0.0
    return reward - (0.0 if ended else no_end_penalty)
