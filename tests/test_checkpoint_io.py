"""Checkpoints: GGUF (all the common tensor types) and Hugging Face safetensors, signatures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize
from safetensors.torch import load_file

from openafm.io import (
    CheckpointError,
    build_model,
    model_signature,
    read_checkpoint,
    read_gguf,
    read_hf,
    write_gguf,
    write_hf,
)
from openafm.model import Transformer


def _logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


IDS = torch.arange(1, 40).view(1, -1) * 7 % 500


def test_hf_round_trip_is_exact_and_uses_llama_names(tiny, tmp_path):
    write_hf(tmp_path, tiny.config, tiny.state_dict())
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert "model.layers.0.post_attention_layernorm.weight" in names
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["num_key_value_heads"] == 2
    ck = read_hf(tmp_path)
    assert ck.config == tiny.config
    again = build_model(ck)
    assert torch.equal(_logits(again, IDS), _logits(tiny, IDS))
    assert model_signature(ck.config, ck.tensors) == model_signature(tiny.config, tiny.state_dict())


def test_gguf_float32_round_trip_is_exact(tiny, tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny.config, tiny.state_dict())
    ck = read_checkpoint(path)
    assert ck.format == "gguf" and ck.config == tiny.config
    assert torch.equal(_logits(build_model(ck), IDS), _logits(tiny, IDS))


@pytest.mark.parametrize(
    ("qtype", "max_rel_rms"),
    [
        (Q.F16, 1e-3),
        (Q.BF16, 5e-3),
        (Q.Q8_0, 1e-2),
        (Q.Q5_0, 0.06),
        (Q.Q5_1, 0.06),
        (Q.Q4_0, 0.12),
        (Q.Q4_1, 0.12),
    ],
)
def test_gguf_quantized_types_read_back_close(tiny, tmp_path, qtype, max_rel_rms):
    path = write_gguf(tmp_path / "q.gguf", tiny.config, tiny.state_dict(), quant=lambda n, t: qtype)
    ck = read_gguf(path)
    assert set(ck.tensor_types.values()) >= {qtype.name}
    for name, original in tiny.state_dict().items():
        if name == "output.weight":
            continue
        err = (ck.tensors[name] - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt()
        # Rows in the wrong order (a Q/K permutation mistake) would give an error near 1.4.
        assert err < max_rel_rms, (name, float(err))


# --- K-quants, written here the way llama.cpp lays them out -----------------------------------

_KQUANT_BLOCK = {Q.Q4_K: 144, Q.Q6_K: 210, Q.Q5_K: 176}
_F16_OFFSETS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.Q5_K: (0, 2)}


def _random_kquant_rows(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    blocks = rng.integers(0, 256, size=(rows * cols // 256, _KQUANT_BLOCK[qtype]), dtype=np.uint8)
    for off in _F16_OFFSETS[qtype]:  # keep the block scales finite and small
        blocks[:, off : off + 2] = (
            rng.uniform(0.001, 0.01, size=len(blocks))
            .astype(np.float16)
            .view(np.uint8)
            .reshape(-1, 2)
        )
    return blocks.reshape(rows, -1)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows (HF → GGUF)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_K])
def test_gguf_k_quants_dequantize_into_the_right_tensors(tmp_path, qtype):
    rng = np.random.default_rng(0)
    shapes = {
        "attn_q": (256, 256),
        "attn_k": (128, 256),
        "attn_v": (128, 256),
        "attn_output": (256, 256),
        "ffn_gate": (512, 256),
        "ffn_up": (512, 256),
        "ffn_down": (256, 512),
    }
    writer = GGUFWriter(tmp_path / "k.gguf", "llama")
    writer.add_embedding_length(256)
    writer.add_block_count(1)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_vocab_size(64)
    writer.add_context_length(128)
    expected = {}
    writer.add_tensor("token_embd.weight", rng.standard_normal((64, 256)).astype(np.float32))
    for norm in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(norm, np.ones(256, dtype=np.float32))
    for short, (rows, cols) in shapes.items():
        raw = _random_kquant_rows(qtype, rows, cols, rng)
        writer.add_tensor(f"blk.0.{short}.weight", raw, raw_dtype=qtype)
        values = dequantize(raw, qtype)
        expected[short] = values  # the GGUF (llama.cpp) row order
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ck = read_gguf(tmp_path / "k.gguf")
    assert ck.config.dim == 256 and ck.tensor_types["layers.0.attn.q.weight"] == qtype.name
    ours = {
        "attn_q": "attn.q",
        "attn_k": "attn.k",
        "attn_v": "attn.v",
        "attn_output": "attn.o",
        "ffn_gate": "mlp.gate",
        "ffn_up": "mlp.up",
        "ffn_down": "mlp.down",
    }
    for short, name in ours.items():
        got = ck.tensors[f"layers.0.{name}.weight"].numpy()
        if short == "attn_q":
            got = _llama_cpp_permute(got, 4)
        elif short == "attn_k":
            got = _llama_cpp_permute(got, 2)
        np.testing.assert_array_equal(got, expected[short])
    assert torch.isfinite(_logits(build_model(ck), torch.tensor([[1, 2, 3]]))).all()


# --- bad input ----------------------------------------------------------------------------------


def test_missing_and_garbage_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_checkpoint(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json and not exactly one \.gguf"):
        read_checkpoint(empty)


def test_truncated_gguf_is_detected(tiny, tmp_path):
    path = write_gguf(tmp_path / "t.gguf", tiny.config, tiny.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_unsupported_architecture_and_tensor_type(tiny, tmp_path):
    writer = GGUFWriter(tmp_path / "m.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'mamba' is not supported"):
        read_checkpoint(tmp_path / "m.gguf")

    path = tmp_path / "q81.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_vocab_size(512)
    writer.add_tensor(
        "token_embd.weight", np.zeros((512, 40 * 2), dtype=np.uint8), raw_dtype=Q.Q8_1
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="unsupported type Q8_1"):
        read_checkpoint(path)


def test_hf_config_of_another_architecture_is_refused(tiny, tmp_path):
    write_hf(tmp_path, tiny.config, tiny.state_dict())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        read_checkpoint(tmp_path)


def test_signature_binds_config_and_every_weight(tiny):
    sd = tiny.state_dict()
    base = model_signature(tiny.config, sd)
    changed = dict(sd)
    w = changed["layers.1.mlp.down.weight"].clone()
    w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))
    changed["layers.1.mlp.down.weight"] = w
    assert model_signature(tiny.config, changed) != base
    from dataclasses import replace

    assert model_signature(replace(tiny.config, rope_theta=20_000.0), sd) != base
    assert model_signature(tiny.config, dict(sd)) == base


@pytest.mark.slow
def test_real_gguf_to_safetensors_to_load_gives_identical_logits(tmp_path):
    from openafm.io import resolve_model

    ck = read_gguf(resolve_model())
    assert ck.tensor_types["layers.0.attn.q.weight"] == "Q4_1"
    assert ck.tensor_types["embed.weight"] == "Q8_0"
    write_hf(tmp_path, ck.config, ck.tensors)
    again = read_hf(tmp_path)
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    assert torch.equal(_logits(build_model(ck), ids), _logits(build_model(again), ids))
    assert model_signature(ck.config, ck.tensors) == model_signature(again.config, again.tensors)
