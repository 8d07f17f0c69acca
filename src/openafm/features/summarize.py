"""Summarization features: the one place their prompt formats and reference fields live.

Each feature maps a record of its data set (AESLC e-mails, DialogSum dialogues, SAMSum chat
messages) to the chat messages the model sees, names the adapter that serves it, and cleans the
model's reply. The adapter trainer, the evaluation command and the product all use these same
formats.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from openafm.runtime import Engine, SamplingParams
from openafm.runtime.batches import generate_in_batches
from openafm.runtime.journal import AnswerJournal

Record = Mapping[str, object]


@dataclass(frozen=True)
class SummaryFeature:
    """A summarization task: input field, instruction, reference fields, reply length."""

    name: str
    input_field: str
    instruction: str
    reference_fields: tuple[str, ...]
    max_input_words: int
    max_tokens: int
    demonstrations: tuple[tuple[str, str], ...] = ()
    """Hand-written (input, summary) pairs for few-shot prompts of the plain base."""
    input_marker: str = ""
    """Text every input of this feature's data set carries (tells sets with one field apart)."""

    @property
    def adapter(self) -> str:
        """The adapter that serves this feature (same name)."""
        return self.name

    def prompt(self, text: str) -> str:
        words = text.split(" ")
        if len(words) > self.max_input_words:
            text = " ".join(words[: self.max_input_words]) + " …"
        return f"{self.instruction}\n\n{text.strip()}"

    def messages(self, record: Record, *, shots: int = 0) -> list[dict[str, str]]:
        """The user turn for one record, after `shots` demonstration turns (few-shot)."""
        if not 0 <= shots <= len(self.demonstrations):
            raise ValueError(
                f"{self.name} has {len(self.demonstrations)} demonstrations, not {shots}"
            )
        turns = []
        for text, summary in self.demonstrations[:shots]:
            turns += [
                {"role": "user", "content": self.prompt(text)},
                {"role": "assistant", "content": summary},
            ]
        return [*turns, {"role": "user", "content": self.prompt(self.input_of(record))}]

    def input_of(self, record: Record) -> str:
        value = record.get(self.input_field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"record has no text in field {self.input_field!r}")
        return value

    def references(self, record: Record) -> list[str]:
        """The human summaries of a record (any of the reference fields it has)."""
        refs = [
            v for f in self.reference_fields if isinstance(v := record.get(f), str) and v.strip()
        ]
        if not refs:
            raise ValueError(f"record has none of the reference fields {self.reference_fields}")
        return refs

    def training_conversations(self, records: Iterable[Record]) -> list[list[dict[str, str]]]:
        """One conversation per record, its answer taken from the references in turn."""
        out = []
        for i, record in enumerate(records):
            refs = self.references(record)
            answer = refs[i % len(refs)]
            out.append([*self.messages(record), {"role": "assistant", "content": answer}])
        return out


def clean_summary(text: str) -> str:
    """The reply's first non-empty line, without a 'Subject:'/'Summary:' label or quotes."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = re.sub(r"^\**\s*(subject( line)?|summary)\s*:\s*\**\s*", "", line, flags=re.I)
    return line.strip().strip('"“”').strip()


SUMMARIZE_EMAIL = SummaryFeature(
    name="summarize-email",
    input_field="email",
    instruction=(
        "Write a subject line for the e-mail below: a short phrase of two to eight words that"
        " says what the e-mail is about or asks for. Reply with the subject line only."
    ),
    reference_fields=("ann0", "ann1", "ann2"),
    max_input_words=250,
    max_tokens=24,
    demonstrations=(
        (
            "Hi team,\nThe server upgrade is scheduled for Saturday from 8am to noon. Trading"
            " systems will be unavailable during that window, so please log off by Friday"
            " evening.\nThanks,\nIT Support",
            "server upgrade saturday morning",
        ),
        (
            "John,\nCould you send me the signed copy of the master agreement? Legal needs it"
            " before Tuesday's meeting.\nKay",
            "need signed master agreement",
        ),
    ),
)
SUMMARIZE_DIALOGUE = SummaryFeature(
    name="summarize-dialogue",
    input_field="dialogue",
    instruction=(
        "Summarize the conversation below in one or two sentences, in the third person."
        " Call the speakers #Person1# and #Person2#. Reply with the summary only."
    ),
    reference_fields=("summary1", "summary2", "summary3", "summary"),
    max_input_words=400,
    max_tokens=72,
    input_marker="#Person1#",
    demonstrations=(
        (
            "#Person1#: Hi, I'd like to book a table for two tonight.\n#Person2#: Certainly."
            " What time?\n#Person1#: Around seven.\n#Person2#: We have a table at 7:30. Is"
            " that all right?\n#Person1#: Perfect, thank you.",
            "#Person1# books a table for two at 7:30 tonight.",
        ),
        (
            "#Person1#: You look tired. What's wrong?\n#Person2#: I stayed up all night"
            " finishing my history paper.\n#Person1#: Did you finish it?\n#Person2#: Yes, but"
            " I don't think it's very good.",
            "#Person2# is tired after staying up all night to finish a history paper.",
        ),
    ),
)
SUMMARIZE_MESSAGES = SummaryFeature(
    name="summarize-messages",
    input_field="dialogue",
    instruction=(
        "Summarize the chat messages below in one sentence, in the third person, naming the"
        " people. Reply with the summary only."
    ),
    reference_fields=("summary",),
    max_input_words=300,
    max_tokens=48,
    demonstrations=(
        (
            "Tom: are we still on for lunch?\nAnna: yes! 12:30 at the usual place\nTom: great,"
            " see you",
            "Tom and Anna will meet for lunch at 12:30 at the usual place.",
        ),
    ),
)
FEATURES: dict[str, SummaryFeature] = {
    f.name: f for f in (SUMMARIZE_EMAIL, SUMMARIZE_DIALOGUE, SUMMARIZE_MESSAGES)
}


def get_feature(name: str) -> SummaryFeature:
    try:
        return FEATURES[name]
    except KeyError:
        raise ValueError(f"unknown feature {name!r}: choose one of {', '.join(FEATURES)}") from None


def feature_for(records: Sequence[Record]) -> SummaryFeature:
    """The feature whose input field (and marker) the records have: e-mails (AESLC), dialogues
    (DialogSum, speakers #Person1#, #Person2#) or chat messages (SAMSum)."""
    if not records:
        raise ValueError("no records")
    for feature in FEATURES.values():
        if all(
            isinstance(r, Mapping)
            and feature.input_field in r
            and feature.input_marker in str(r[feature.input_field])
            for r in records
        ):
            return feature
    fields = ", ".join(f.input_field for f in FEATURES.values())
    raise ValueError(f"records need one of the input fields: {fields}")


def replies(
    engine: Engine,
    feature: SummaryFeature,
    records: Sequence[Record],
    *,
    adapter: str | None = None,
    shots: int = 0,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    journal: AnswerJournal | None = None,
) -> list[str]:
    """The model's greedy replies to `records` as they are (batched by prompt length; in input
    order; batches in `journal` are not regenerated); `summarize` cleans them to the summary
    line."""
    prompts = [engine.tokenizer.encode_chat(feature.messages(r, shots=shots)) for r in records]
    params = SamplingParams(max_tokens=feature.max_tokens, temperature=0.0)
    done = generate_in_batches(
        engine,
        prompts,
        params,
        adapter=adapter,
        batch_size=batch_size,
        on_batch=on_batch,
        journal=journal,
    )
    return [c.text for c in done]


def summarize(
    engine: Engine,
    feature: SummaryFeature,
    records: Sequence[Record],
    *,
    adapter: str | None = None,
    shots: int = 0,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy summaries of `records` (batched by prompt length; returned in input order)."""
    texts = replies(
        engine,
        feature,
        records,
        adapter=adapter,
        shots=shots,
        batch_size=batch_size,
        on_batch=on_batch,
    )
    return [clean_summary(t) for t in texts]
