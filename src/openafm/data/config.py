"""`CurateConfig`: which stages run, in which order, with which thresholds."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

# Per-document stages, in the default order; the corpus stages (dedup, decontamination) run
# last, over the whole corpus, in this order.
DOCUMENT_STAGES = (
    "optout",
    "extract",
    "language",
    "gopher_repetition",
    "gopher_quality",
    "c4",
    "fineweb",
    "profanity",
    "pii",
    "quality_model",
)
CORPUS_STAGES = ("exact_dedup", "fuzzy_dedup", "decontaminate")
ALL_STAGES = DOCUMENT_STAGES + CORPUS_STAGES


@dataclass(frozen=True)
class CurateConfig:
    """Settings of `afm data curate`; load overrides from TOML with `CurateConfig.from_file`."""

    stages: tuple[str, ...] = ALL_STAGES
    crawler_token: str = "Applebot"
    training_token: str = "Applebot-Extended"
    languages: tuple[str, ...] = ("en",)
    language_threshold: float = 0.65
    profanity_max_ratio: float = 0.01
    pii_max_hits: int = 20
    minhash_ngrams: int = 5
    minhash_bands: int = 16  # 16 bands x 12 rows: candidates from about 0.79 Jaccard
    minhash_rows: int = 12
    seed: int = 1
    tokenizer_file: str = ""  # tokenizer.json to count tokens per stage with; empty: chars only
    quality_model: str = ""  # .npz model from `afm data train-quality`; empty: stage skipped
    quality_threshold: float = 0.5
    eval_sets: tuple[str, ...] = ()  # files whose 13-grams must not appear in the corpus
    decontam_ngram: int = 13
    decontam_max_docs: int = 10  # an n-gram in more corpus documents than this is "common"

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(ALL_STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"a stage is listed twice in {list(self.stages)}")

    @property
    def document_stages(self) -> tuple[str, ...]:
        return tuple(s for s in self.stages if s in DOCUMENT_STAGES)

    @property
    def corpus_stages(self) -> tuple[str, ...]:
        return tuple(s for s in CORPUS_STAGES if s in self.stages)

    def minhash_s_curve(self) -> dict:
        """Probability that two documents with 5-gram Jaccard similarity s become duplicates."""
        b, r = self.minhash_bands, self.minhash_rows
        return {
            "bands": b,
            "rows": r,
            "threshold": round((1 / b) ** (1 / r), 3),
            "p_duplicate": {
                f"{s:g}": round(1 - (1 - s**r) ** b, 4) for s in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
            },
        }

    @classmethod
    def from_file(cls, path: Path | str) -> CurateConfig:
        """A TOML file whose keys are this class's fields (lists for the tuple fields)."""
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)
