"""Preference pairs for the reward model, read from JSONL (optionally gzipped).

Two layouts are read:
- Anthropic HH-RLHF: `{"chosen": transcript, "rejected": transcript}`, each a full
  "\\n\\nHuman: … \\n\\nAssistant: …" dialogue; the two share everything up to the last
  assistant turn, which is the pair's prompt.
- OpenAFM's own: `{"prompt": text or [{role, content}], "chosen": text, "rejected": text}` with
  optional `"strength"` (one of STRENGTH_LABELS) and optional `"chosen_grades"` /
  `"rejected_grades"` (`{grade name: level 0-2}`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from openafm.files import open_text
from openafm.posttrain.losses import STRENGTH_LABELS
from openafm.posttrain.reward_model import GRADES, LEVELS

Messages = tuple[tuple[str, str], ...]
log = logging.getLogger("openafm")
_TURN = re.compile(r"\n\n(Human|Assistant):")


class PreferenceDataError(ValueError):
    """A preference file is missing, empty or malformed."""


class _DivergentPrompt(ValueError):
    """HH pairs whose transcripts differ before the last turn (a few hundred exist)."""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (chat turns), the preferred and the other answer, the probability p that the
    preferred one is better (1.0 when no strength is given), and grades per response (-1 where
    unknown)."""

    prompt: Messages
    chosen: str
    rejected: str
    p: float = 1.0
    chosen_grades: tuple[int, ...] = (-1,) * len(GRADES)
    rejected_grades: tuple[int, ...] = (-1,) * len(GRADES)


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """HH's "\\n\\nHuman: …\\n\\nAssistant: …" text as (role, content) turns."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not a Human/Assistant transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _hh_pair(record: dict[str, object]) -> PreferencePair:
    chosen = parse_transcript(str(record["chosen"]))
    rejected = parse_transcript(str(record["rejected"]))
    if chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant":
        raise ValueError("a transcript does not end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise _DivergentPrompt("chosen and rejected do not share their prompt")
    return PreferencePair(tuple(chosen[:-1]), chosen[-1][1], rejected[-1][1])


def _grades(value: object) -> tuple[int, ...]:
    if value is None:
        return (-1,) * len(GRADES)
    if not isinstance(value, dict) or set(value) - set(GRADES):
        raise ValueError(f"grades must map some of {', '.join(GRADES)} to a level")
    levels = tuple(int(value.get(name, -1)) for name in GRADES)  # type: ignore[call-overload]
    if any(level < -1 or level >= LEVELS for level in levels):
        raise ValueError(f"grade levels are 0 to {LEVELS - 1}")
    return levels


def _own_pair(record: dict[str, object]) -> PreferencePair:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        turns: Messages = (("user", prompt),)
    elif isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt
    ):
        turns = tuple((str(m.get("role", "user")), m["content"]) for m in prompt)
    else:
        raise ValueError("'prompt' must be text or a list of {role, content}")
    if not isinstance(record["chosen"], str) or not isinstance(record["rejected"], str):
        raise ValueError("'chosen' and 'rejected' must be text")
    strength = record.get("strength")
    if strength is not None and strength not in STRENGTH_LABELS:
        raise ValueError(f"'strength' must be one of {', '.join(STRENGTH_LABELS)}")
    return PreferencePair(
        turns,
        record["chosen"],
        record["rejected"],
        1.0 if strength is None else STRENGTH_LABELS[str(strength)],
        _grades(record.get("chosen_grades")),
        _grades(record.get("rejected_grades")),
    )


def read_preferences(path: Path) -> list[PreferencePair]:
    """Every pair of a JSONL (or .jsonl.gz) file; errors name the line."""
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such file")
    pairs, divergent = [], 0
    try:
        with open_text(path) as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                    missing = [k for k in ("chosen", "rejected") if k not in record]
                    if missing:
                        raise ValueError(f"missing field(s) {', '.join(missing)}")
                    pairs.append(_own_pair(record) if "prompt" in record else _hh_pair(record))
                except _DivergentPrompt:
                    divergent += 1
                except (ValueError, KeyError) as error:
                    raise PreferenceDataError(f"{where}: {error}") from None
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise PreferenceDataError(f"{path}: cannot be read ({error})") from None
    if divergent:
        log.warning("left out %d pairs whose two dialogues differ before the last turn", divergent)
    if not pairs:
        raise PreferenceDataError(f"{path} holds no preference pairs")
    return pairs
