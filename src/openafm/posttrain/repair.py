"""Verified repairs: mechanical edits that make an answer meet the format constraints its content
does not touch (the request repeated first, letter case, wrapping quotation marks, a required
last phrase, a postscript, no commas). A repair is kept only where the checkers then pass every
constraint of the prompt.

A small model almost never writes a whole answer in lower case when asked, so a committee's
samples hold no winner to learn that from, and an RL policy never sees the reward for it;
repaired answers give rejection sampling those winners (a programmatic member of the committee).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from openafm.eval import ifeval
from openafm.eval.ifeval import IFEvalPrompt
from openafm.posttrain.committee import Candidate
from openafm.posttrain.constraint_prompts import REPEAT_REQUEST

Edit = Callable[[str, Mapping[str, object]], str]


def _postscript(text: str, kwargs: Mapping[str, object]) -> str:
    return f"{text}\n\n{kwargs.get('postscript_marker') or 'P.S.'} I hope this helps."


# in the order applied: additions first, then case, then the quotation marks around it all
EDITS: dict[str, Edit] = {
    REPEAT_REQUEST: lambda text, kw: f"{kw['prompt_to_repeat']}\n\n{text}",
    "punctuation:no_comma": lambda text, _: re.sub(r",\s*", " ", text),
    "detectable_content:postscript": _postscript,
    "startend:end_checker": lambda text, kw: f"{text}\n{kw['end_phrase']}",
    "change_case:english_lowercase": lambda text, _: text.lower(),
    "change_case:english_capital": lambda text, _: text.upper(),
    "startend:quotation": lambda text, _: f'"{text}"',
}


def repaired(prompt: IFEvalPrompt, text: str) -> str | None:
    """`text` edited for each mechanical constraint it misses, if it then passes all of the
    prompt's constraints and the edits changed it; otherwise None."""
    constraints = dict(zip(prompt.instruction_ids, prompt.kwargs, strict=True))
    edited = text.strip()
    for name, edit in EDITS.items():
        if name in constraints:
            met = ifeval.score(prompt, edited).strict[prompt.instruction_ids.index(name)]
            if not met:
                edited = edit(edited, constraints[name])
    if edited == text.strip() or not all(ifeval.score(prompt, edited).strict):
        return None
    return edited


def repair_groups(
    prompts: Sequence[IFEvalPrompt], groups: Sequence[Sequence[Candidate]]
) -> tuple[list[list[Candidate]], int]:
    """Each group with every finished answer that misses a constraint replaced by its verified
    repair where one exists; and how many were repaired."""
    out, count = [], 0
    for prompt, group in zip(prompts, groups, strict=True):
        fixed = []
        for candidate in group:
            text = repaired(prompt, candidate.text) if candidate.finished else None
            if text is not None:
                candidate = replace(candidate, text=text)
                count += 1
            fixed.append(candidate)
        out.append(fixed)
    return out, count
