"""Profanity: share of a document's words that are on a bad-words list, after undoing leetspeak."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
)
_WORD = re.compile(r"[\w@$!]+(?:[-'][\w@$!]+)*")


def normalise(word: str) -> str:
    """Lower-case, leetspeak undone (`sh1t` → `shit`), letters repeated 3+ times collapsed."""
    word = word.lower().translate(_LEET)
    return re.sub(r"(.)\1{2,}", r"\1", word)


@cache
def bad_words(language: str = "en") -> tuple[frozenset[str], frozenset[tuple[str, ...]]]:
    """The shipped LDNOOBW list: single words, and multi-word phrases as word tuples."""
    text = resources.files("openafm.data.assets").joinpath(f"badwords_{language}.txt").read_text()
    entries = [line.strip().lower() for line in text.splitlines() if line.strip()]
    singles = frozenset(e for e in entries if " " not in e)
    phrases = frozenset(tuple(e.split()) for e in entries if " " in e)
    return singles, phrases


def profane_words(text: str, language: str = "en") -> tuple[int, int]:
    """(words on the list, words in all) for `text`; a phrase counts once per word it spans."""
    singles, phrases = bad_words(language)
    words = [normalise(w) for w in _WORD.findall(text)]
    flagged = [w in singles for w in words]
    longest = max((len(p) for p in phrases), default=0)
    for i in range(len(words)):
        for n in range(2, longest + 1):
            if tuple(words[i : i + n]) in phrases:
                flagged[i : i + n] = [True] * n
    return sum(flagged), len(words)
