"""PII, profanity and robots.txt detectors, against labelled data and constructed cases."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from openafm.data import RobotsSnapshots, find_pii, mask_pii
from openafm.data.pii import iban_valid, luhn_valid
from openafm.data.profanity import normalise, profane_words

FIXTURES = Path(__file__).parent / "fixtures"
PRESIDIO_TYPES = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "US_SSN": "SSN",
    "CREDIT_CARD": "CREDIT_CARD",
    "IP_ADDRESS": "IP",
    "IBAN_CODE": "IBAN",
}


def precision_recall(name: str = "synth_dataset_v2.json") -> dict[str, tuple[float, float]]:
    """Per-type precision and recall of `find_pii` on a presidio span-labelled set."""
    records = json.loads((FIXTURES / "pii" / name).read_text())
    tp, fp, fn = Counter(), Counter(), Counter()
    for r in records:
        gold = [
            (PRESIDIO_TYPES[s["entity_type"]], s["start_position"], s["end_position"])
            for s in r["spans"]
            if s["entity_type"] in PRESIDIO_TYPES
        ]
        pred = find_pii(r["full_text"])
        for p in pred:
            hit = any(k == p.kind and p.start < e and s < p.end for k, s, e in gold)
            (tp if hit else fp)[p.kind] += 1
        for k, s, e in gold:
            if not any(p.kind == k and p.start < e and s < p.end for p in pred):
                fn[k] += 1
    return {
        k: (tp[k] / max(tp[k] + fp[k], 1), tp[k] / max(tp[k] + fn[k], 1))
        for k in PRESIDIO_TYPES.values()
        if tp[k] + fp[k] + fn[k]
    }


@pytest.mark.parametrize("name", ["synth_dataset_v2.json", "generated_small.json"])
def test_pii_precision_and_recall_on_presidio_labelled_spans(name):
    scores = precision_recall(name)
    print(json.dumps({k: {"precision": p, "recall": r} for k, (p, r) in scores.items()}))
    assert {"EMAIL", "PHONE", "SSN", "CREDIT_CARD", "IP"} <= set(scores)
    for kind, (precision, recall) in scores.items():
        assert precision >= 0.95 and recall >= 0.95, (kind, precision, recall)


def test_pii_reads_context_words_as_presidio_does():
    lines = (FIXTURES / "pii" / "presidio_context_sentences_tests.txt").read_text().splitlines()
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    ours, others = [], []
    for label, sentence in zip(lines[::2], lines[1::2], strict=True):
        kinds = [span.kind for span in find_pii(sentence)]
        (ours if label in PRESIDIO_TYPES else others).append((label, sentence, kinds))
    assert len(ours) == 12 and len(others) == 24
    found = [s for label, s, kinds in ours if kinds == [PRESIDIO_TYPES[label]]]
    # "these phones 052 5552606 074-7111234": two numbers a space apart read as one too long
    assert len(found) == 11, [o for o in ours if o[1] not in found]
    assert all(kinds == [] for _, _, kinds in others), others  # ITIN, licence, passport, TIN


def test_pii_free_text_has_no_detections():
    for name in ("wikitext-2.valid.head.txt", "pride_and_prejudice_excerpt.txt"):
        text = (FIXTURES / "text" / name).read_text()
        assert find_pii(text) == [], name
    lookalikes = (
        "He played from 1990-1999 and in the 2012-2013 season; the study covers 1800-2000. "
        "Ship to 17151 2450 Crown St, zip code 90010-170. Driver's license number is "
        "2270-66-1551, tax identification number is 64-6221541, licence U62928788557186."
    )
    assert find_pii(lookalikes) == []


def test_pii_masks_with_typed_placeholders():
    text = (
        "Mail jane.doe@example.org or call +1 (555) 010-9999. SSN 078-05-1121, card "
        "4111 1111 1111 1111, server 192.168.10.4 and 2001:db8::8a2e:370:7334, "
        "IBAN GB82 WEST 1234 5698 7654 32."
    )
    masked = mask_pii(text, find_pii(text))
    assert masked == (
        "Mail <EMAIL> or call <PHONE>. SSN <SSN>, card <CREDIT_CARD>, server <IP> and <IP>, "
        "IBAN <IBAN>."
    )


def test_pii_checksums_reject_lookalikes():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB82WEST12345698765433")
    text = "Order 4111 1111 1111 1112 shipped; ref GB82WEST12345698765433; version 1.2.3.4.5"
    assert find_pii(text) == []


def test_profanity_undoes_leetspeak_and_spares_innocent_words():
    assert normalise("Sh1T") == "shit" and normalise("fuuuuck") == "fuck"
    bad, total = profane_words("what a load of sh1t, you b1tch, f@ck this")
    assert bad == 2 and total == 9
    assert profane_words("Scunthorpe is an assessment of classic passages.")[0] == 0
    assert profane_words("a blow job offer")[0] == 2  # multi-word entries count per word


def write_robots(root: Path, date: str, host: str, text: str | bytes) -> None:
    path = root / date / host / "robots.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def test_robots_newest_snapshot_applies_retroactively(tmp_path):
    write_robots(tmp_path, "2024-01-01", "news.example", "User-agent: *\nAllow: /\n")
    write_robots(
        tmp_path, "2025-06-01", "news.example", "User-agent: Applebot-Extended\nDisallow: /\n"
    )
    write_robots(
        tmp_path,
        "2025-06-01",
        "blog.example",
        "User-agent: Applebot\nDisallow: /private/\nAllow: /private/ok$\n",
    )
    write_robots(tmp_path, "2025-06-01", "bad.example", b"\xff\xfe garbage \x00 Disallow")
    snaps = RobotsSnapshots(tmp_path)
    assert snaps.verdict("https://news.example/2023/story").reason == "training_opt_out"
    assert snaps.verdict("https://blog.example/private/x").reason == "robots_disallow"
    assert snaps.verdict("https://blog.example/private/ok").allowed  # longest match wins
    assert snaps.verdict("https://blog.example/public").allowed
    assert snaps.verdict("https://bad.example/").allowed  # malformed file: no valid rule
    assert snaps.verdict("https://unknown.example/").allowed


def test_robots_rejects_a_folder_that_is_not_a_date(tmp_path):
    write_robots(tmp_path, "latest", "a.example", "User-agent: *\nDisallow: /\n")
    with pytest.raises(ValueError, match="not a date"):
        RobotsSnapshots(tmp_path)


def test_curate_config_from_toml(tmp_path):
    from openafm.data import CurateConfig

    path = tmp_path / "curate.toml"
    path.write_text('stages = ["language", "pii"]\nlanguages = ["en", "de"]\npii_max_hits = 3\n')
    config = CurateConfig.from_file(path)
    assert config.stages == ("language", "pii") and config.languages == ("en", "de")
    assert config.document_stages == ("language", "pii") and config.corpus_stages == ()
    path.write_text("pii_max_hit = 3\n")
    with pytest.raises(ValueError, match="unknown setting"):
        CurateConfig.from_file(path)
    with pytest.raises(ValueError, match="unknown stage"):
        CurateConfig(stages=("pii", "dedupe"))
