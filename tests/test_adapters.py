"""LoRA adapters on the tiny model: the seam's math, files (ours and PEFT's), the runtime cache,
per-request switching, and every kind of bad adapter refused without side effects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openafm.adapters import (
    AdapterError,
    LoraAdapter,
    LoraConfig,
    check_adapter_name,
    load_adapter,
    save_adapter,
)
from openafm.adapters.peft_format import export_peft, import_peft
from openafm.io import model_signature
from openafm.runtime import AdapterCache, Engine, SamplingParams
from tests.conftest import byte_tokenizer, make_tiny


def random_adapter(model, name: str, seed: int, **config) -> LoraAdapter:
    """An adapter with non-zero A and B, as after training (values exact in bfloat16)."""
    adapter = LoraAdapter.fresh(name, model, LoraConfig(**config), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for a, b in adapter.pairs.values():
            a.copy_(a.bfloat16().float())
            b.copy_((torch.randn(b.shape, generator=gen) * 0.05).bfloat16().float())
    adapter.metadata["base_signature"] = model_signature(model.config, model.state_dict())
    return adapter


def merged_copy(model, adapter: LoraAdapter):
    """The base with `W + scale·B A` folded into each targeted weight: independent of the seam."""
    merged = make_tiny()
    merged.load_state_dict(model.state_dict())
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for path, (a, b) in adapter.pairs.items():
            modules[path].weight += adapter.config.scale * (b.double() @ a.double()).float()
    return merged


@pytest.fixture
def adapters_dir(tmp_path, tiny) -> Path:
    root = tmp_path / "adapters"
    save_adapter(random_adapter(tiny, "alpha", 1), root / "alpha")
    save_adapter(random_adapter(tiny, "beta", 2, rank=4, targets=("q", "v", "down")), root / "beta")
    return root


def make_engine(model, root: Path, **kwargs) -> Engine:
    signature = model_signature(model.config, model.state_dict())
    cache = AdapterCache(model, signature, resolve=lambda name: root / name, **kwargs)
    return Engine(model, byte_tokenizer(), adapters=cache)


TOKENS = torch.tensor([[5, 77, 130, 9, 250, 31, 64, 2]])


def test_fresh_adapter_reproduces_the_base_exactly(tiny):
    base = tiny(TOKENS)
    adapter = LoraAdapter.fresh("zero", tiny, LoraConfig())
    adapter.attach(tiny)
    with torch.no_grad():
        assert torch.equal(tiny(TOKENS), base)


def test_unmerged_adapter_equals_merged_weights(tiny):
    adapter = random_adapter(tiny, "x", 3, rank=8, layers=(1,))
    expected = merged_copy(tiny, adapter)(TOKENS)
    adapter.attach(tiny)
    with torch.no_grad():
        got = tiny(TOKENS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, make_tiny()(TOKENS), atol=1e-3)


def test_adapter_file_round_trip(tiny, tmp_path):
    adapter = random_adapter(tiny, "round", 4, targets=("k", "o", "up"), layers=(0,))
    adapter.metadata["training"] = {"steps": 3}
    save_adapter(adapter, tmp_path / "round")
    meta = json.loads((tmp_path / "round" / "adapter.json").read_text())
    assert meta["rank"] == 16 and meta["targets"] == ["k", "o", "up"] and meta["layers"] == [0]
    assert meta["training"] == {"steps": 3} and meta["dtype"] == "bfloat16"
    tensors = load_file(tmp_path / "round" / "adapter.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    loaded = load_adapter(tmp_path / "round")
    assert loaded.config == adapter.config
    for path, (a, b) in adapter.pairs.items():
        assert torch.equal(loaded.pairs[path][0].float(), a)
        assert torch.equal(loaded.pairs[path][1].float(), b)


def test_peft_round_trip(tiny, tmp_path):
    adapter = random_adapter(tiny, "p", 5, rank=4, targets=("q", "gate", "down"))
    export_peft(adapter, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "q_proj"]
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight" in keys
    back = import_peft(tmp_path / "peft", "p")
    assert back.config.rank == 4 and back.config.scale == adapter.config.scale
    assert set(back.pairs) == set(adapter.pairs)
    for path, (a, b) in adapter.pairs.items():
        assert torch.equal(back.pairs[path][0].float(), a)
        assert torch.equal(back.pairs[path][1].float(), b)


def test_mixed_batch_equals_each_adapter_alone(tiny, adapters_dir):
    engine = make_engine(tiny, adapters_dir)
    tok = engine.tokenizer
    prompts = [tok.encode("hello there"), tok.encode("a longer prompt, padded"), tok.encode("hi")]
    choice = ["alpha", None, "beta"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    together = engine.generate(prompts, params, adapters=choice)
    for prompt, name, got in zip(prompts, choice, together, strict=True):
        alone = engine.generate([prompt], params, adapters=name)[0]
        assert got.token_ids == alone.token_ids
    plain = engine.generate([prompts[0]], params)[0]
    assert plain.token_ids != together[0].token_ids  # the adapter changes the output
    assert engine.adapters.loads == 2  # each loaded once, then served from the cache


def test_adapter_logits_in_a_mixed_batch_match_merged_models(tiny, adapters_dir):
    cache = make_engine(tiny, adapters_dir).adapters
    from openafm.runtime.adapter_cache import overlaid, overlay

    rows = cache.resolve_rows(["beta", "alpha"])
    with overlaid([tiny], overlay(rows)), torch.no_grad():
        got = tiny(TOKENS.repeat(2, 1))
    for i, name in enumerate(["beta", "alpha"]):
        expected = merged_copy(tiny, load_adapter(adapters_dir / name))(TOKENS)[0]
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-4)
    assert all(m.delta is None for m in tiny.modules() if hasattr(m, "delta"))


def test_lru_cache_evicts_under_its_byte_budget(tiny, adapters_dir):
    one = make_engine(tiny, adapters_dir).adapters.get("alpha").nbytes
    cache = make_engine(tiny, adapters_dir, budget_bytes=one + 1).adapters
    cache.get("alpha")
    cache.get("beta")
    assert cache.names == ["beta"]
    assert cache.nbytes <= one + 1


def test_adapter_for_another_base_is_refused_unless_forced(tiny, adapters_dir):
    other = make_tiny(seed=7)
    engine = make_engine(other, adapters_dir)
    with pytest.raises(AdapterError, match="trained on base"):
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2), adapters="alpha")
    assert engine.adapters.names == []
    forced = make_engine(other, adapters_dir, force=True)
    assert forced.generate([[1, 2, 3]], SamplingParams(max_tokens=2), adapters="alpha")


def _corrupt(root: Path, how: str) -> None:
    target = root / "beta"
    meta_path, weights = target / "adapter.json", target / "adapter.safetensors"
    meta = json.loads(meta_path.read_text())
    tensors = load_file(weights)
    if how == "malformed json":
        meta_path.write_text("{not json")
    elif how == "missing weights":
        weights.unlink()
    elif how in ("wrong rank", "wrong width"):
        end, cut = (
            ("lora_b", (slice(None), slice(0, 2)))
            if how == "wrong rank"
            else ("lora_a", (slice(None), slice(0, 32)))
        )
        key = next(k for k in tensors if k.endswith(end))
        tensors[key] = tensors[key][cut].contiguous()
        save_file(tensors, weights)
    elif how == "wrong dtype":
        save_file({k: v.float() for k, v in tensors.items()}, weights)
    elif how == "rank too large":
        meta["rank"] = 999
        meta_path.write_text(json.dumps(meta))
    elif how == "unknown target":
        meta["targets"] = ["q", "bogus"]
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how, message",
    [
        ("malformed json", "not valid JSON"),
        ("missing weights", "adapter.safetensors is missing"),
        ("wrong rank", "rank 4 needs"),
        ("wrong width", "expected"),
        ("wrong dtype", "bfloat16 or float16"),
        ("rank too large", "rank 999"),
        ("unknown target", "unknown targets"),
    ],
)
def test_bad_adapter_fails_cleanly_and_serving_goes_on(tiny, adapters_dir, how, message):
    engine = make_engine(tiny, adapters_dir)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    before = engine.generate([[1, 2, 3]], params, adapters="alpha")[0].token_ids
    _corrupt(adapters_dir, how)
    with pytest.raises(AdapterError, match=message):
        engine.generate([[1, 2, 3], [4, 5]], params, adapters=["alpha", "beta"])
    assert engine.adapters.names == ["alpha"]
    assert all(m.delta is None for m in tiny.modules() if hasattr(m, "delta"))
    assert engine.generate([[1, 2, 3]], params, adapters="alpha")[0].token_ids == before


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "", "x" * 65, "a b"])
def test_adapter_names_cannot_traverse_paths(name):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        check_adapter_name(name)


def test_rank_larger_than_a_layer_is_refused(tiny):
    with pytest.raises(AdapterError, match="exceeds the width"):
        LoraAdapter.fresh("big", tiny, LoraConfig(rank=80))


def test_exported_adapter_loads_in_hugging_face_peft_with_equal_logits(tmp_path):
    """Independent check of the PEFT layout: transformers + peft compute what our seam computes."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from dataclasses import replace

    from openafm.io import write_hf
    from openafm.model import Transformer, get_preset

    model = Transformer(replace(get_preset("tiny"), qk_norm=False))  # HF llama has no QK-norm
    model.init_weights(seed=3)
    model.eval()
    write_hf(tmp_path / "base", model.config, model.state_dict())
    adapter = random_adapter(model, "hf", 6, rank=4, targets=("q", "v", "o", "up", "down"))
    export_peft(adapter, tmp_path / "peft")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    adapter.attach(model)
    with torch.no_grad():
        ours = model(TOKENS)
        theirs = hf(input_ids=TOKENS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), hf.disable_adapter():
        assert not torch.allclose(hf(input_ids=TOKENS).logits, theirs, atol=1e-3)
