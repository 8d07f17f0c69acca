"""The adapters shipped in models/adapters: valid for the default base, small, and doing their job."""

from __future__ import annotations

import json

import pytest

from openafm.adapters.registry import SHIPPED_DIR, find_adapter
from openafm.features import get_feature, summarize
from openafm.runtime import engine_for
from tests.conftest import FIXTURES

SHIPPED = {
    "summarize-email": FIXTURES / "summaries" / "aeslc_test_head4.jsonl",
    "summarize-dialogue": FIXTURES / "summaries" / "dialogsum_test_head3.jsonl",
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_adapter_files(name):
    assert find_adapter(name).name == name
    meta = json.loads((SHIPPED_DIR / name / "adapter.json").read_text())
    assert (SHIPPED_DIR / name / "adapter.safetensors").stat().st_size < 12 * 2**20
    assert meta["rank"] == 16 and len(meta["targets"]) == 7
    assert meta["training"]["command"].startswith("afm adapter train")
    for data, results in meta["evaluation"].items():
        adapter, base = results["adapter"], results["prompted_base"]
        assert adapter["n"] == base["n"] >= 200, data
        assert adapter["rougeL_ci"][0] > base["rougeL_ci"][1], data  # intervals do not overlap


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_adapter_serves_the_default_base(smollm2, name):
    meta = json.loads((SHIPPED_DIR / name / "adapter.json").read_text())
    assert meta["base_signature"] == smollm2.signature()
    engine = engine_for(smollm2)
    feature = get_feature(name)
    records = [json.loads(line) for line in SHIPPED[name].read_text().splitlines()]
    summaries = summarize(engine, feature, records, adapter=name)
    assert all(summaries)
    words = [len(s.split()) for s in summaries]
    if name == "summarize-email":  # subject lines, as the references are
        assert max(words) <= 12
    else:  # one or two sentences naming the speakers the DialogSum way
        assert all(5 <= n <= 60 for n in words)
        assert all("#Person" in s for s in summaries)
