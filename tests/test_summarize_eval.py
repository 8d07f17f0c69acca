"""Summarization features and their evaluation: prompt formats, ROUGE, the `afm eval` command."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from openafm.adapters import LoraAdapter, LoraConfig, save_adapter
from openafm.eval import bootstrap_ci, rouge_report
from openafm.features import clean_summary, feature_for, get_feature
from openafm.io import model_signature
from tests.conftest import FIXTURES, make_tiny
from tests.test_cli import afm, assert_one_line_error

AESLC = FIXTURES / "summaries" / "aeslc_test_head4.jsonl"
DIALOGSUM = FIXTURES / "summaries" / "dialogsum_test_head3.jsonl"


@pytest.fixture(scope="module")
def tiny_dir(tiny_long_dir):
    return tiny_long_dir


def test_evaluations_are_recorded_and_a_zero_adapter_scores_as_the_base(tiny_dir, tmp_path):
    home = tmp_path / "home"
    model = make_tiny()
    adapter = LoraAdapter.fresh("mail", model, LoraConfig(rank=2))
    adapter.metadata["base_signature"] = model_signature(
        replace(model.config, max_seq_len=2048), model.state_dict()
    )
    save_adapter(adapter, home / "adapters" / "mail")
    common = ("eval", "summarize", "--data", str(AESLC), "--model", str(tiny_dir))
    for extra in (("--adapter", "mail"), ()):
        proc = afm(*common, *extra, "--record", "mail", "--json", home=home)
        assert proc.returncode == 0, proc.stderr.decode()
    meta = json.loads((home / "adapters" / "mail" / "adapter.json").read_text())
    results = meta["evaluation"][AESLC.name]
    assert results["adapter"]["adapter"] == "mail" and results["prompted_base"]["adapter"] is None
    for key in ("n", "rouge1", "rouge2", "rougeL", "mean_words"):
        assert results["adapter"][key] == results["prompted_base"][key], key


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rouge_matches_hand_computed_scores():
    report = rouge_report(
        ["the cat sat", "completely different words", "meeting moved to friday"],
        [["the cat ran"], ["nothing shared here"], ["other", "meeting moved to friday"]],
    )
    # unigram F: 2/3, 0, 1 (best of two references); bigram F: 1/2, 0, 1; LCS F: 2/3, 0, 1
    assert report["rouge1"] == pytest.approx((2 / 3 + 0 + 1) / 3, abs=1e-4)
    assert report["rouge2"] == pytest.approx((1 / 2 + 0 + 1) / 3, abs=1e-4)
    assert report["rougeL"] == pytest.approx((2 / 3 + 0 + 1) / 3, abs=1e-4)
    assert report["n"] == 3 and report["mean_words"] == pytest.approx(10 / 3, abs=0.01)
    low, high = report["rougeL_ci"]
    assert 0 <= low <= report["rougeL"] <= high <= 1


def test_bootstrap_interval_narrows_with_more_examples():
    rng = np.random.default_rng(0)
    small, large = rng.random(50), rng.random(2000)
    assert np.diff(bootstrap_ci(large)) < 0.35 * np.diff(bootstrap_ci(small))
    assert bootstrap_ci(np.full(10, 0.25)) == (0.25, 0.25)


def test_features_pick_fields_and_references():
    emails, dialogues = records(AESLC), records(DIALOGSUM)
    assert feature_for(emails).name == "summarize-email"
    assert feature_for(dialogues).name == "summarize-dialogue"
    email = get_feature("summarize-email")
    assert email.references(emails[0]) == [emails[0][k] for k in ("ann0", "ann1", "ann2")]
    turns = email.messages(emails[0], shots=2)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert emails[0]["email"].strip()[:40] in turns[-1]["content"]
    conversations = get_feature("summarize-dialogue").training_conversations(dialogues)
    assert [c[-1]["content"] for c in conversations] == [
        dialogues[i][f"summary{i + 1}"] for i in range(3)
    ]
    with pytest.raises(ValueError, match="input fields"):
        feature_for([{"text": "x"}])


def test_clean_summary_takes_the_first_line_without_labels():
    assert clean_summary('\n Subject: "Meeting moved"\nMore text') == "Meeting moved"
    assert clean_summary("**Summary:** #Person1# asks for help.") == "#Person1# asks for help."


@pytest.mark.parametrize("path", [AESLC, DIALOGSUM])
def test_eval_command_reports_rouge_json(tiny_dir, path):
    proc = afm("eval", "summarize", "--data", str(path), "--model", str(tiny_dir), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert {"n", "rouge1", "rouge2", "rougeL", "rougeL_ci", "mean_words"} <= set(report)
    assert report["n"] == len(records(path))
    assert 0 <= report["rougeL_ci"][0] <= report["rougeL"] <= report["rougeL_ci"][1] <= 1


def test_eval_command_errors(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no known fields"}\n')
    assert_one_line_error(
        afm("eval", "summarize", "--data", str(bad), "--model", str(tiny_dir)), 1, "input fields"
    )
    assert_one_line_error(
        afm(
            "eval", "summarize", "--data", str(AESLC), "--model", str(tiny_dir), "--adapter", "nope"
        ),
        1,
        "unknown adapter",
    )
