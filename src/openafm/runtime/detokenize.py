"""Turning generated ids into text as they arrive: UTF-8 safe, with stop strings held back."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from openafm.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"
_MAX_PENDING = 8  # a UTF-8 character spans at most 4 byte-level tokens; give up waiting after 8


class IncrementalDetokenizer:
    """Decodes one id at a time, emitting text only once its bytes form complete characters.

    Byte-level BPE may split one character across tokens; decoding such a prefix yields U+FFFD.
    Pending ids are held until they decode cleanly (a true U+FFFD is emitted after a few tokens).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith(_INCOMPLETE) and len(self.pending) < _MAX_PENDING:
            return ""
        self.pending.clear()
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending.clear()
        return text


class StopMatcher:
    """Finds the first stop string in growing text and says how much text is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)

    def find(self, text: str, start: int = 0) -> int:
        """Index where the earliest stop string begins (searching from `start`), or -1."""
        hits = [i for s in self.stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
        return min(hits) if hits else -1

    def safe_length(self, text: str) -> int:
        """Length of the prefix of `text` that cannot be the start of a stop string."""
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(text) - hold


@dataclass
class RowText:
    """The text of one generated answer as its tokens arrive, and why it stopped."""

    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None

    def append(
        self,
        token: int,
        stop_ids: Collection[int],
        stops: StopMatcher,
        *,
        last: bool,
        ignore_eos: bool = False,
    ) -> str:
        """Add one token; return the text that became safe to show (stop strings held back)."""
        self.token_ids.append(token)
        if token in stop_ids and not ignore_eos:
            self.finish_reason = "stop"
            self.text += self.detok.flush()
        else:
            before = len(self.text)
            self.text += self.detok.push(token)
            if last:
                self.text += self.detok.flush()
                self.finish_reason = "length"
            hit = stops.find(self.text, before) if stops.stops else -1
            if hit >= 0:
                self.text = self.text[:hit]
                self.finish_reason = "stop"
        end = len(self.text) if self.finish_reason else stops.safe_length(self.text)
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece
