"""The run logs every trainer appends to: a line torn by a kill, and a resume that cuts."""

from __future__ import annotations

import json

import pytest

from openafm.files import JsonLinesError, cut_log, read_log


def test_a_last_line_torn_by_a_kill_is_left_out_and_other_damage_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    log.write_text(whole + '{"step": 4, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2, 3]
    log.write_text(whole + '{"step": 4}')  # complete JSON, only the newline missing
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4]
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(JsonLinesError, match=r"metrics.jsonl:2: not valid JSON"):
        read_log(log)


def test_a_resumed_run_cuts_its_log_back_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert cut_log(log, lambda r: True) == [] and not log.exists()
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)) + '{"ste')
    kept = cut_log(log, lambda r: r["step"] <= 5)
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5]
    assert log.read_text() == "".join(json.dumps({"step": s}) + "\n" for s in range(1, 6))
