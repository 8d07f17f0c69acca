"""Tensor names: ours ↔ Hugging Face llama ↔ GGUF (llama.cpp)."""

from __future__ import annotations

import re

# Per-layer tensors: (our suffix, Hugging Face suffix, GGUF suffix).
_LAYER_NAMES = (
    ("attn_norm.weight", "input_layernorm.weight", "attn_norm.weight"),
    ("attn.q.weight", "self_attn.q_proj.weight", "attn_q.weight"),
    ("attn.k.weight", "self_attn.k_proj.weight", "attn_k.weight"),
    ("attn.v.weight", "self_attn.v_proj.weight", "attn_v.weight"),
    ("attn.o.weight", "self_attn.o_proj.weight", "attn_output.weight"),
    ("attn.q_norm.weight", "self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("attn.k_norm.weight", "self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate.weight", "mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up.weight", "mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down.weight", "mlp.down_proj.weight", "ffn_down.weight"),
)
_GLOBAL_NAMES = (
    ("embed.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "model.norm.weight", "output_norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
)
_OURS = re.compile(r"layers\.(\d+)\.(.+)")
_HF = re.compile(r"model\.layers\.(\d+)\.(.+)")
_GGUF = re.compile(r"blk\.(\d+)\.(.+)")

_FORMATS = {"ours": 0, "hf": 1, "gguf": 2}
_PATTERNS = (_OURS, _HF, _GGUF)
_LAYER_PREFIX = ("layers.{}.", "model.layers.{}.", "blk.{}.")


def convert_name(name: str, src: str, dst: str) -> str | None:
    """Translate a tensor name between formats ("ours", "hf", "gguf"); None if unknown."""
    s, d = _FORMATS[src], _FORMATS[dst]
    for row in _GLOBAL_NAMES:
        if row[s] == name:
            return row[d]
    m = _PATTERNS[s].fullmatch(name)
    if m:
        layer, suffix = m.groups()
        for row in _LAYER_NAMES:
            if row[s] == suffix:
                return _LAYER_PREFIX[d].format(layer) + row[d]
    return None
