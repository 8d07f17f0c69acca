"""IFEval (Zhou et al., 2023): does a response follow the prompt's verifiable instructions?

The 25 instruction checkers and the strict/loose tests are lm-eval's port of Google's reference
code (`lm_eval.tasks.ifeval`), called as they are. Two changes let them run offline on a fresh
machine, where lm-eval would download NLTK's `punkt_tab` data at import and then fail:

- the import-time download is skipped, and the two checkers that need the data get tokenizers
  that need none: `length_constraints:number_sentences` counts sentences with NLTK's Punkt
  algorithm at its default parameters plus a list of common English abbreviations (the
  reference loads Punkt's trained English model), and `change_case:capital_word_frequency`
  splits words with NLTK's Treebank tokenizer over the whole response rather than sentence by
  sentence (the capitalised words it counts are the same);
- `langdetect` is seeded, and so is the draw a checker makes when the data gives it an invalid
  argument (one prompt asks for a frequency of the "letter" `!`, which the checker replaces
  with a random letter), so every run gives the same verdicts.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from openafm.eval.intervals import bootstrap_ci, bootstrap_ratio_ci
from openafm.eval.records import responses_by_prompt
from openafm.files import read_jsonl

MAX_NEW_TOKENS = 1280  # the reference harness's generation budget

ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "a.m",
        "p.m",
        "u.s",
        "u.k",
        "no",
        "fig",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "inc",
        "ltd",
        "co",
        "corp",
        "dept",
        "est",
        "approx",
    ]
)


@dataclass(frozen=True)
class IFEvalPrompt:
    """One IFEval prompt and the instructions it carries (ids and their arguments)."""

    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Verdict:
    """Whether a response follows each instruction of its prompt, strictly and loosely."""

    strict: tuple[bool, ...]
    loose: tuple[bool, ...]


def _sentence_tokenizer() -> Any:
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


@functools.cache
def checkers() -> ModuleType:
    """lm-eval's IFEval `utils` module, patched to need no downloaded NLTK data."""
    import langdetect
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # lm-eval fetches punkt_tab at import
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and says so on standard output
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = download
    # an answer with no letters makes langdetect fail; lm-eval logs it (stderr) and passes it
    logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL)
    sentences = _sentence_tokenizer()
    instructions_util._get_sentence_tokenizer = lambda: sentences
    instructions_util.nltk = SimpleNamespace(
        word_tokenize=functools.partial(nltk.word_tokenize, preserve_line=True),
        tokenize=nltk.tokenize,
    )
    langdetect.DetectorFactory.seed = 0
    return utils


def instruction_ids() -> frozenset[str]:
    """Every instruction id the checkers know."""
    checkers()  # first: it imports lm-eval's modules without their download
    from lm_eval.tasks.ifeval import instructions_registry

    return frozenset(instructions_registry.INSTRUCTION_DICT)


def _prompt_from(record: object, where: str, known: frozenset[str]) -> IFEvalPrompt:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: not a JSON object")
    missing = [f for f in ("key", "prompt", "instruction_id_list", "kwargs") if f not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise ValueError(f"{where}: instruction_id_list and kwargs must be lists of one length")
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"{where}: unknown instruction id(s) {', '.join(map(str, unknown))}")
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise ValueError(f"{where}: empty prompt")
    return IFEvalPrompt(int(record["key"]), record["prompt"], tuple(ids), tuple(kwargs))


def read_prompts(path: Path) -> list[IFEvalPrompt]:
    """IFEval prompts from Google's `input_data.jsonl` format (errors name the line)."""
    known = instruction_ids()
    prompts = [_prompt_from(r, f"{path}:{n}", known) for n, r in read_jsonl(path)]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def read_responses(path: Path, prompts: Sequence[IFEvalPrompt]) -> list[str]:
    """The responses to `prompts` in a file of Google's `input_response_data` format."""
    return responses_by_prompt(path, [p.prompt for p in prompts])


def score(prompt: IFEvalPrompt, response: str) -> Verdict:
    """The reference harness's strict and loose verdicts for one response."""
    utils = checkers()
    example = utils.InputExample(
        key=prompt.key,
        instruction_id_list=list(prompt.instruction_ids),
        prompt=prompt.prompt,
        kwargs=[dict(k) for k in prompt.kwargs],
    )
    state = random.getstate()
    random.seed(prompt.key)  # a checker given an invalid argument draws one at random
    try:
        strict = utils.test_instruction_following_strict(example, response)
        loose = utils.test_instruction_following_loose(example, response)
    finally:
        random.setstate(state)
    return Verdict(tuple(strict.follow_instruction_list), tuple(loose.follow_instruction_list))


def _level_figures(name: str, followed: Sequence[Sequence[bool]]) -> dict[str, object]:
    prompt_level = [float(all(f)) for f in followed]
    kept, given = [float(sum(f)) for f in followed], [float(len(f)) for f in followed]
    return {
        f"prompt_level_{name}": round(sum(prompt_level) / len(prompt_level), 4),
        f"prompt_level_{name}_ci": [round(x, 4) for x in bootstrap_ci(prompt_level)],
        f"instruction_level_{name}": round(sum(kept) / sum(given), 4),
        f"instruction_level_{name}_ci": [round(x, 4) for x in bootstrap_ratio_ci(kept, given)],
    }


def report(prompts: Sequence[IFEvalPrompt], verdicts: Sequence[Verdict]) -> dict[str, object]:
    """Prompt- and instruction-level accuracy, strict and loose, with 95% bootstrap intervals
    (instruction level resamples whole prompts), and accuracy per instruction type."""
    if not verdicts or len(prompts) != len(verdicts):
        raise ValueError(f"{len(verdicts)} verdicts for {len(prompts)} prompts")
    out: dict[str, object] = {"n_prompts": len(prompts)}
    out["n_instructions"] = sum(len(p.instruction_ids) for p in prompts)
    for name in ("strict", "loose"):
        out |= _level_figures(name, [getattr(v, name) for v in verdicts])
    for name in ("strict", "loose"):  # model cards quote this mean ("average prompt/inst")
        levels = [float(out[f"{level}_level_{name}"]) for level in ("prompt", "instruction")]
        out[f"average_{name}"] = round(sum(levels) / 2, 4)
    out["per_instruction"] = per_instruction(prompts, verdicts)
    return out


def cap_bounds(verdicts: Sequence[Verdict], cut: Sequence[bool]) -> dict[str, object]:
    """What a longer budget could change: greedy answers that stopped before the cap would be
    the same, so only the `cut` ones (stopped by the cap) may flip. For each level and mode,
    [lowest, highest] accuracy with every cut answer failing or passing all its instructions."""
    if len(verdicts) != len(cut):
        raise ValueError(f"{len(cut)} cap flags for {len(verdicts)} verdicts")
    out: dict[str, object] = {"n_cut_at_cap": sum(cut)}
    for name in ("strict", "loose"):
        kept = [getattr(v, name) for v, c in zip(verdicts, cut, strict=True) if not c]
        free = [len(getattr(v, name)) for v, c in zip(verdicts, cut, strict=True) if c]
        prompts_ok = sum(all(f) for f in kept)
        instructions_ok = sum(sum(f) for f in kept)
        n_instructions = sum(len(getattr(v, name)) for v in verdicts)
        out[f"prompt_level_{name}_bounds"] = [
            round(prompts_ok / len(verdicts), 4),
            round((prompts_ok + len(free)) / len(verdicts), 4),
        ]
        out[f"instruction_level_{name}_bounds"] = [
            round(instructions_ok / n_instructions, 4),
            round((instructions_ok + sum(free)) / n_instructions, 4),
        ]
    return out


def per_instruction(
    prompts: Iterable[IFEvalPrompt], verdicts: Iterable[Verdict]
) -> dict[str, dict[str, float | int]]:
    """For each instruction id: how often it occurs and the share followed, strict and loose."""
    counts: dict[str, list[int]] = {}
    for prompt, verdict in zip(prompts, verdicts, strict=True):
        for iid, strict, loose in zip(
            prompt.instruction_ids, verdict.strict, verdict.loose, strict=True
        ):
            row = counts.setdefault(iid, [0, 0, 0])
            row[0] += 1
            row[1] += strict
            row[2] += loose
    return {
        iid: {"n": n, "strict": round(s / n, 4), "loose": round(lo / n, 4)}
        for iid, (n, s, lo) in sorted(counts.items())
    }
