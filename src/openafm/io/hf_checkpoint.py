"""The Hugging Face layout: `config.json` + `model.safetensors` with llama tensor names."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from openafm.files import write_json_atomic
from openafm.io.errors import CheckpointError
from openafm.io.gguf_file import Checkpoint
from openafm.io.names import convert_name
from openafm.model import ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def config_to_hf(config: ModelConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if config.qk_norm:
        hf["qk_norm"] = True
    hf.update(extra or {})
    return hf


def config_from_hf(hf: Mapping[str, Any], source: Path) -> ModelConfig:
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported (supported: llama)"
        )
    if hf.get("rope_scaling"):
        raise CheckpointError(f"{source}: rope_scaling is not supported yet")
    try:
        n_heads = int(hf["num_attention_heads"])
        dim = int(hf["hidden_size"])
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=dim,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            ffn_dim=int(hf["intermediate_size"]),
            head_dim=int(hf.get("head_dim") or dim // n_heads),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(hf.get("rope_theta", 10_000.0)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=bool(hf.get("qk_norm", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}/{CONFIG_FILE}: missing or invalid field ({exc})") from None


def read_hf(directory: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a Hugging Face llama directory into our names."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{directory} is not a model directory: {p.name} is missing")
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc})") from None
    config = config_from_hf(hf, directory)
    try:
        raw = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        ours = convert_name(name, "hf", "ours")
        if ours is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise CheckpointError(f"{weights_path}: unexpected tensor {name!r}")
        tensors[ours] = tensor.to(dtype)
    types = {n: str(t.dtype).removeprefix("torch.") for n, t in raw.items()}
    return Checkpoint(config, tensors, directory, "hf", types)


def write_hf(
    directory: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` (each atomically) that transformers can load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "output.weight" and config.tie_embeddings:
            continue  # one tensor: the head is the embedding
        hf_name = convert_name(name, "ours", "hf")
        if hf_name is None:
            raise ValueError(f"no Hugging Face name for tensor {name!r}")
        out[hf_name] = tensor.detach().cpu().contiguous()
    dtypes = {str(t.dtype).removeprefix("torch.") for t in out.values() if t.is_floating_point()}
    extra = {"torch_dtype": dtypes.pop() if len(dtypes) == 1 else "float32", **(extra_config or {})}
    tmp = directory / (WEIGHTS_FILE + ".partial")
    save_file(out, tmp, metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_FILE)
    write_json_atomic(directory / CONFIG_FILE, config_to_hf(config, extra))
    return directory
