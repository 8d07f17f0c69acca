"""The shipped on-device compressed model: its recipe, a rebuild from it, and its quality."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from openafm.adapters import check_base, detach, load_adapter
from openafm.compress import default_model
from openafm.compress.calibration import text_windows
from openafm.compress.pipeline import DEFAULT_CALIBRATION, compress_model
from openafm.eval.quality import compare_models, reference_log_probs
from openafm.files import sha256_file
from openafm.io import model_signature
from openafm.io.compressed_checkpoint import bits_summary, read_compression_meta, save_compressed
from openafm.runtime import SamplingParams, engine_for, load_pretrained
from openafm.serve.worker import PALETTIZED_ADAPTERS
from tests.conftest import FIXTURES, TINY_COMPRESS, byte_tokenizer, make_tiny

NAME = default_model.PALETTIZED_DEFAULT
RECIPE = default_model.RECIPES_DIR / NAME


def test_recipe_is_complete_and_within_budget():
    recipe = json.loads((RECIPE / default_model.RECIPE_FILE).read_text())
    assert recipe["bpw"] <= 4.0
    assert len(recipe["bits"]) == 30 * 7
    assert set(recipe["bits"].values()) <= set(recipe["config"]["bit_widths"])
    adapter = json.loads((RECIPE / "recovery" / "adapter.json").read_text())
    assert adapter["role"] == "accuracy-recovery" and adapter["rank"] == 16
    assert adapter["training"]["tokens"] > 100_000
    assert adapter["base_signature"] == recipe["signature"]


def test_the_shipped_palettized_adapters_are_made_for_the_recipes_model():
    recipe = json.loads((RECIPE / default_model.RECIPE_FILE).read_text())
    shipped = sorted(PALETTIZED_ADAPTERS.glob("*/"))
    assert shipped
    for folder in shipped:
        meta = json.loads((folder / "adapter.json").read_text())
        assert meta["base_signature"] == recipe["signature"], folder.name


def test_a_recipe_written_from_a_compressed_model_rebuilds_that_model(tmp_path, monkeypatch):
    def load_base(name: str):
        model = make_tiny()
        return model, byte_tokenizer(), model_signature(model.config, model.state_dict())

    model, tokenizer, base_signature = load_base("tiny")
    config = TINY_COMPRESS
    made = compress_model(model, tokenizer, DEFAULT_CALIBRATION, config).model
    made_with = {  # what `afm compress` records
        "base": "tiny",
        "base_signature": base_signature,
        "calibration_sha256": sha256_file(DEFAULT_CALIBRATION),
        "config": config.to_dict(),
    }
    original = save_compressed(made, tmp_path / "compressed", made_with=made_with)
    recipes = tmp_path / "recipes"
    default_model.write_recipe(original, recipes / "tiny-palettized")
    monkeypatch.setattr(default_model, "RECIPES_DIR", recipes)
    monkeypatch.setattr(default_model, "built_dir", lambda name: tmp_path / "built" / name)
    assert default_model.recipe_names() == ["tiny-palettized"]

    rebuilt = read_compression_meta(default_model.ensure_built("tiny-palettized", load_base))
    recipe = json.loads((recipes / "tiny-palettized" / default_model.RECIPE_FILE).read_text())
    assert recipe["signature"] == model_signature(made.config, made.state_dict())
    assert rebuilt["made_with"]["signature"] == recipe["signature"]
    # same CPU, same recipe: the same bits in every table and index
    assert rebuilt["weights_sha256"] == read_compression_meta(original)["weights_sha256"]
    assert {n: e["bits"] for n, e in rebuilt["tensors"].items()} == recipe["bits"]

    def another_base(name: str):
        model, tokenizer, _ = load_base(name)
        return model, tokenizer, "another base"

    monkeypatch.setattr(default_model, "built_dir", lambda name: tmp_path / "elsewhere" / name)
    with pytest.raises(ValueError, match="not the one"):
        default_model.ensure_built("tiny-palettized", another_base)


@pytest.mark.slow
def test_rebuilt_from_its_recipe_it_stays_close_to_the_base(smollm2, tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "built_dir", lambda name: tmp_path / name)

    def load_base(name: str):  # a copy: building compresses the model in place
        return copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.signature()

    recipe = json.loads((RECIPE / default_model.RECIPE_FILE).read_text())
    start = time.perf_counter()
    path = default_model.ensure_built(NAME, load_base)
    seconds = time.perf_counter() - start
    print(f"rebuilt {NAME} in {seconds:.0f} s")
    compressed = load_pretrained(path)
    meta = json.loads((path / "compression.json").read_text())
    assert {n: e["bits"] for n, e in meta["tensors"].items()} == recipe["bits"]
    assert bits_summary(compressed.model)["bpw"] == pytest.approx(recipe["bpw"])
    assert compressed.default_adapter is not None  # the recovery adapter is attached
    # on any CPU the rebuild is the recipe's model, so the shipped feature adapters bind to it
    assert compressed.signature() == recipe["signature"]
    summarize = PALETTIZED_ADAPTERS / "summarize-email"
    check_base(load_adapter(summarize), compressed.signature())

    def refuse_to_load(name: str):
        raise RuntimeError("the base was loaded to build again")

    assert default_model.ensure_built(NAME, refuse_to_load) == path  # built once
    meta["made_with"]["signature"] = "an older recipe's"  # a model built by an older release
    (path / "compression.json").write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="build again"):
        default_model.ensure_built(NAME, refuse_to_load)

    text = FIXTURES / "text" / "pride_and_prejudice_excerpt.txt"
    windows = text_windows(smollm2.tokenizer, text, window=256, max_tokens=1024)
    reference = reference_log_probs(smollm2.model, windows)
    with_recovery = compare_models(compressed.model, reference, windows)
    engine = engine_for(compressed)
    ids = engine.encode("What is the capital of France?")
    answer = engine.generate([ids], SamplingParams(max_tokens=12))[0].text
    assert "Paris" in answer
    detach(compressed.model)
    without = compare_models(compressed.model, reference, windows)
    assert with_recovery.kld_mean < 0.85 * without.kld_mean
    assert with_recovery.kld_mean < 0.2
    assert torch.isfinite(torch.tensor(with_recovery.ppl_ratio))
