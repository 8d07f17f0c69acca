"""The curation pipeline end to end: real WARC files, and one constructed case per stage."""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from openafm.data import CurateConfig, CurationError, curate
from openafm.data.shards import read_shards, write_shards
from openafm.runtime import load_tokenizer_for
from tests.conftest import byte_tokenizer
from tests.test_cli import afm, assert_one_line_error

FIXTURES = Path(__file__).parent / "fixtures"
GERMAN = (
    "Die Stadt liegt an einem breiten Fluss, und im Sommer kommen viele Besucher, um die alten "
    "Häuser am Marktplatz zu sehen. Am Abend sitzen die Leute in den Gärten der Gasthäuser und "
    "erzählen von der Arbeit, vom Wetter und von den Kindern. Im Winter ist es dagegen still; "
    "nur die Glocken der Kirche hört man über den Dächern. Wer länger bleibt, lernt die "
    "Nachbarn kennen und wird bald zum Essen eingeladen. So vergehen die Jahre in dieser Stadt "
    "ruhig und freundlich, und kaum jemand möchte von hier fortziehen."
)


def read_jsonl_gz(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            rows += [json.loads(line) for line in f]
    return rows


def prose(n: int, words: int = 150) -> list[str]:
    """`n` distinct passages of narrative English prose (no dialogue), one paragraph per line."""
    text = (FIXTURES / "text" / "pride_and_prejudice_excerpt.txt").read_text()
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) > 8]
    paragraphs = [p for p in paragraphs if p.endswith(".") and "“" not in p and "_" not in p]
    passages, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p.split()) for p in current) >= words:
            passages.append("\n".join(current))
            current = []
    assert len(passages) >= n
    return passages[:n]


def swear(text: str) -> str:
    words = text.split(" ")
    return " ".join(w if i % 8 else "shit" for i, w in enumerate(words))


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    """A corpus with one case per stage, curated once with robots snapshots."""
    root = tmp_path_factory.mktemp("constructed")
    p = prose(10)
    boilerplate = "This page is part of a collection that is shared under the same licence as every other page here."
    for i in (0, 1, 4, 7):  # the four documents that are kept
        p[i] = f"{p[i]}\n{boilerplate}"
    near = p[1].split(" ")
    near[40], near[120] = "suddenly", "quietly"
    docs = [
        ("keep-0", "https://ok.example/a", p[0]),
        ("keep-1", "https://ok.example/b", p[1]),
        ("exact-dup", "https://ok.example/c", p[0].replace(" ", "  ").replace("\n", " \n")),
        ("near-dup", "https://ok.example/d", " ".join(near)),
        ("no-crawl", "https://blocked.example/x", p[2]),
        ("no-train", "https://notrain.example/y", p[3]),
        ("pii-masked", "https://ok.example/e", p[4] + " Write to anne@example.com, SSN 078-05-1121."),
        ("pii-heavy", "https://ok.example/f", p[5] + " Write to " + ", ".join(f"u{i}@mail.example" for i in range(30)) + "."),
        ("profane", "https://ok.example/g", swear(p[6])),
        ("german", "https://ok.example/h", GERMAN),
        ("keep-2", "https://ok.example/i", p[7]),
        ("leak", "https://ok.example/j", p[8]),
    ]  # fmt: skip
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": i, "url": u, "text": t}) + "\n" for i, u, t in docs))
    robots = root / "robots"
    for date, host, rules in [
        ("2024-01-01", "notrain.example", "User-agent: *\nAllow: /\n"),
        ("2025-01-01", "notrain.example", "User-agent: Applebot-Extended\nDisallow: /\n"),
        ("2025-01-01", "blocked.example", "User-agent: Applebot\nDisallow: /\n"),
    ]:
        (robots / date / host).mkdir(parents=True)
        (robots / date / host / "robots.txt").write_text(rules)
    evals = root / "eval.jsonl"  # a leaked passage, and the boilerplate common in the corpus
    leaked = " ".join(p[8].split()[30:50])
    evals.write_text(json.dumps({"document": leaked, "summary": boilerplate}) + "\n")
    config = CurateConfig(eval_sets=(str(evals),), decontam_max_docs=2)
    out = root / "out"
    stats = curate([str(data)], out, config, robots_dir=str(robots))
    return out, stats


def test_each_constructed_case_is_removed_by_its_stage(constructed):
    out, _ = constructed
    kept = {r["id"]: r for r in read_jsonl_gz(out / "kept")}
    assert set(kept) == {"keep-0", "keep-1", "keep-2", "pii-masked"}
    assert "<EMAIL>" in kept["pii-masked"]["text"] and "<SSN>" in kept["pii-masked"]["text"]
    assert "anne@example.com" not in kept["pii-masked"]["text"]
    removed = {
        r["id"]: (stage.name, r["metadata"].get("filter_reason"))
        for stage in (out / "removed").iterdir()
        for r in read_jsonl_gz(stage)
    }
    assert removed == {
        "no-crawl": ("optout", "robots_disallow"),
        "no-train": ("optout", "training_opt_out"),
        "german": ("language", "language_de"),
        "profane": ("profanity", "profanity"),
        "pii-heavy": ("pii", "pii_heavy"),
        "exact-dup": ("exact_dedup", None),
        "near-dup": ("fuzzy_dedup", None),
        "leak": ("decontaminate", "eval_overlap"),
    }


def test_stats_account_for_every_document(constructed):
    out, stats = constructed
    assert json.loads((out / "stats.json").read_text()) == stats
    rows = stats["stages"]
    assert stats["documents_in"] == 12 and stats["documents_kept"] == 4
    for before, after in itertools.pairwise(rows):
        assert after["in"] == before["out"], (before["stage"], after["stage"])
    for row in rows:
        assert row["in"] - row["out"] == row["removed"] == sum(row["removed_by_reason"].values())
    by_stage = {r["stage"]: r for r in rows}
    assert by_stage["optout"]["removed_by_reason"] == {"robots_disallow": 1, "training_opt_out": 1}
    assert by_stage["pii"]["masked_EMAIL"] == 31
    assert "| optout | 12 | 10 | 2 |" in (out / "report.md").read_text()


def test_real_warc_files_and_a_rerun_that_resumes(tmp_path):
    out = tmp_path / "out"
    stats = curate([str(FIXTURES / "warc")], out)
    intake = stats["stages"][1]
    assert stats["documents_in"] == 45
    assert intake["removed_by_reason"] == {"corrupt_record": 1, "not_html": 4}
    kept = read_jsonl_gz(out / "kept")
    assert len(kept) == stats["documents_kept"] > 10
    assert all(r["metadata"]["language"] == "en" for r in kept)
    assert not any("<html" in r["text"].lower() for r in kept)
    before = {p.name: p.read_bytes() for p in (out / "kept").iterdir()}
    again = curate([str(FIXTURES / "warc")], out)  # every task is done: nothing is redone
    assert {p.name: p.read_bytes() for p in (out / "kept").iterdir()} == before
    assert again == stats


def test_same_input_gives_the_same_output(tmp_path):
    inputs = [str(FIXTURES / "warc" / "sample-0001.warc.gz")]
    config = CurateConfig(stages=("extract", "language", "pii"))
    a = read_jsonl_gz(curate(inputs, tmp_path / "a", config) and tmp_path / "a" / "kept")
    b = read_jsonl_gz(curate(inputs, tmp_path / "b", config, workers=2) and tmp_path / "b" / "kept")
    assert sorted((r["id"], r["text"]) for r in a) == sorted((r["id"], r["text"]) for r in b)


def test_a_stage_that_empties_its_input_fails_loudly(tmp_path):
    data = tmp_path / "de.jsonl"
    data.write_text(json.dumps({"text": GERMAN}) + "\n")
    with pytest.raises(CurationError, match="'language' kept 0 of 1"):
        curate([str(data)], tmp_path / "out", CurateConfig(stages=("language",)))


def test_bad_records_are_recorded_not_fatal(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine text here"}\nnot json\n{"text": ""}\n{"id": 3}\n')
    html = tmp_path / "latin1.html"
    html.write_bytes(b"<html><body><p>caf\xe9 \xff\xfe</p></body></html>")
    stats = curate([str(data), str(html)], tmp_path / "out", CurateConfig(stages=("pii",)))
    assert stats["stages"][1]["removed_by_reason"] == {
        "empty_page": 1,
        "malformed_json": 2,
        "undecodable": 1,
    }


@pytest.mark.slow  # counts tokens with the default model's tokenizer
def test_cli_only_pii_masks_a_jsonl_corpus(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text(
        json.dumps({"text": "Reach me at bob@example.net or 555-867-5309 today."}) + "\n"
    )
    result = afm(
        "data", "curate", "--input", str(data), "--out", str(tmp_path / "o"), "--only", "pii"
    )
    assert result.returncode == 0, result.stderr.decode()
    [row] = read_jsonl_gz(tmp_path / "o" / "kept")
    assert row["text"] == "Reach me at <EMAIL> or <PHONE> today."
    stats = afm("data", "stats", str(tmp_path / "o"), "--json")
    report = json.loads(stats.stdout)
    assert report["documents_kept"] == 1
    assert report["stages"][-1]["tokens_out"] == len(
        load_tokenizer_for().encode_documents([row["text"]])[0]
    )


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = afm(
        "data", "curate", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, 1, "input not found")
    assert result.stderr.decode().strip().startswith("error: input not found")
    assert_one_line_error(afm("data", "stats", str(tmp_path)), 1, "no stats.json")


def test_ray_executor_and_two_local_workers_give_one_result(tmp_path):
    for part in range(3):
        rows = [{"text": f"Doc {part}.{i}: write to user{i}@example.org."} for i in range(5)]
        (tmp_path / f"in{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = [a for p in range(3) for a in ("--input", str(tmp_path / f"in{p}.jsonl"))]
    # Ray gets one CPU so it cannot starve the test process; local runs 2 worker processes.
    for executor, workers in (("local", "2"), ("ray", "1")):
        result = afm(
            "data", "curate", *inputs, "--out", str(tmp_path / executor), "--only", "pii",
            "--executor", executor, "--workers", workers, "--no-count-tokens",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr.decode()
    local, ray = (read_jsonl_gz(tmp_path / e / "kept") for e in ("local", "ray"))
    assert sorted(r["text"] for r in ray) == sorted(r["text"] for r in local)
    assert all("<EMAIL>" in r["text"] for r in ray) and len(ray) == 15


def test_token_shards_round_trip_the_kept_documents(constructed, tmp_path):
    tokenizer = byte_tokenizer()

    out, _ = constructed
    kept = [r["text"] for r in read_jsonl_gz(out / "kept")]
    manifest = write_shards(out / "kept", tmp_path / "shards", tokenizer, shard_tokens=2000)
    manifest2, arrays = read_shards(tmp_path / "shards")
    assert manifest2 == manifest and manifest["documents"] == len(kept)
    assert len(arrays) == len(manifest["shards"]) > 1
    ids = [int(t) for a in arrays for t in a]
    assert len(ids) == manifest["tokens"]
    eos = tokenizer.eos_id
    docs, current = [], []
    for t in ids:
        if t == eos:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    assert docs == kept
    first = tmp_path / "shards" / manifest["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-2] + b"\x00\x00")
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_shards(tmp_path / "shards")


def test_special_token_text_in_documents_stays_text():
    tokenizer = byte_tokenizer()
    text = "look: <|im_start|> and <|endoftext|>"
    special = tokenizer.encode(text)
    [plain] = tokenizer.encode_documents([text])
    assert tokenizer.decode(plain, skip_special_tokens=False) == text
    assert len(plain) > len(special)


def test_quality_classifier_separates_prose_from_raw_pages(tmp_path):
    from openafm.data.quality import read_texts, train_quality_model

    positive = read_texts(FIXTURES / "text" / "pride_and_prejudice_excerpt.txt", window=80)
    negative = [
        t
        for w in sorted((FIXTURES / "warc").glob("sample-*.warc.gz"))
        for t in read_texts(w, window=80)
    ]
    model = tmp_path / "quality.npz"
    metrics = train_quality_model(positive, negative, model, test_fraction=0.3)
    assert metrics["test_examples"] >= 30
    assert metrics["roc_auc"] >= 0.9 and metrics["accuracy"] >= 0.8, metrics
    assert json.loads(model.with_suffix(".json").read_text()) == metrics

    data = tmp_path / "docs.jsonl"
    docs = [prose(1)[0], negative[0]]
    data.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs))
    )
    config = CurateConfig(stages=("quality_model",), quality_model=str(model))
    stats = curate([str(data)], tmp_path / "out", config)
    assert stats["stages"][-1]["removed_by_reason"] == {"low_quality": 1}
    [kept] = read_jsonl_gz(tmp_path / "out" / "kept")
    assert kept["id"] == "0" and kept["metadata"]["quality"] >= 0.5


def test_main_text_extraction_keeps_content_and_drops_boilerplate():
    from openafm.data.extraction_eval import extraction_scores

    scores = extraction_scores(
        FIXTURES / "web-html" / "evaldata_subset.json", FIXTURES / "web-html" / "pages"
    )
    assert scores["pages"] == 6 and scores["pages_without_text"] == 0
    # On all 86 shared pages: 0.927 kept, 0.934 dropped (see README).
    assert scores["keep_snippets_kept"] >= 0.85 and scores["drop_snippets_dropped"] >= 0.85


def test_oversized_and_empty_pages_are_recorded(tmp_path):
    big = tmp_path / "big.html"
    big.write_bytes(b"<html><body>" + b"<p>word</p>" * (1024 * 1024) + b"</body></html>")
    empty = tmp_path / "empty.html"
    empty.write_bytes(b"   ")
    config = CurateConfig(stages=("extract",))
    with pytest.raises(CurationError, match="'intake' kept 0 of 2"):
        curate([str(big), str(empty)], tmp_path / "out", config)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["stages"][1]["removed_by_reason"] == {"empty_page": 1, "too_large": 1}


def test_a_killed_run_resumes_without_redoing_or_duplicating(tmp_path):
    import os
    import signal
    import time

    passages = prose(12, words=60)
    inputs = []
    for f in range(6):  # six tasks of about a second each
        path = tmp_path / f"part{f}.jsonl"
        rows = [
            {"id": f"{f}-{i}", "text": f"{passages[i % 12]}\nPart {f}, item {i}."}
            for i in range(150)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        inputs += ["--input", str(path)]
    out = tmp_path / "out"
    base = [sys.executable, "-m", "openafm", "data", "curate", *inputs]
    only = ["--only", "language,gopher_repetition,exact_dedup", "--no-count-tokens"]
    cmd = [*base, "--out", str(out), *only]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    done = out / "logs" / "documents" / "completions"
    while proc.poll() is None and len(list(done.glob("*"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: (out / "logs" / "documents" / "logs" / f"task_{p.name}.log").stat().st_mtime_ns for p in done.glob("*")}  # fmt: skip
    assert 2 <= len(finished) < 6, "the run was not interrupted mid-way"

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    for name, mtime in finished.items():  # finished tasks were not run again
        assert (
            out / "logs" / "documents" / "logs" / f"task_{name}.log"
        ).stat().st_mtime_ns == mtime
    kept = read_jsonl_gz(out / "kept")
    clean = tmp_path / "clean"
    assert subprocess.run([*base, "--out", str(clean), *only], capture_output=True).returncode == 0
    assert sorted(r["id"] for r in kept) == sorted(r["id"] for r in read_jsonl_gz(clean / "kept"))
    assert len({r["id"] for r in kept}) == len(kept) == 6 * 150  # no document written twice
