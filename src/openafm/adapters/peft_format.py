"""Hugging Face PEFT's LoRA layout: `adapter_config.json` + `adapter_model.safetensors`.

Tensors are named `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (rank x in)
and `....lora_B.weight` (out x rank); the scale is `lora_alpha / r` (or `/ sqrt(r)` with
rsLoRA). Export writes what `peft.PeftModel.from_pretrained` loads onto the Hugging Face copy
of the base; import reads such a directory back into our adapter.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from openafm.adapters.lora import AdapterError, LoraAdapter, LoraConfig, check_adapter_name
from openafm.io.names import convert_name

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"(?:base_model\.model\.)?(model\.layers\.\d+\.\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight"
)


def _hf_module(path: str) -> str:
    name = convert_name(f"{path}.weight", "ours", "hf")
    assert name is not None, path
    return name.removesuffix(".weight")


def _our_module(hf_module: str) -> str | None:
    name = convert_name(f"{hf_module}.weight", "hf", "ours")
    return None if name is None else name.removesuffix(".weight")


def export_peft(adapter: LoraAdapter, directory: str | Path, *, base_model: str = "") -> Path:
    """Write `adapter` in PEFT's layout (float16/bfloat16 kept as stored)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in adapter.pairs.items():
        module = _PREFIX + _hf_module(path)
        tensors[f"{module}.lora_A.weight"] = a.detach().contiguous()
        tensors[f"{module}.lora_B.weight"] = b.detach().contiguous()
    target_modules = sorted({_hf_module(p).rsplit(".", 1)[1] for p in adapter.pairs})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.config.rank,
        "lora_alpha": adapter.config.alpha,
        "target_modules": target_modules,
        "layers_to_transform": None
        if adapter.config.layers is None
        else list(adapter.config.layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    save_file(tensors, str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def import_peft(directory: str | Path, name: str) -> LoraAdapter:
    """Read a PEFT LoRA directory (plain LoRA on llama projections) as our adapter."""
    directory = Path(directory)
    try:
        config = json.loads((directory / PEFT_CONFIG).read_text())
        tensors = load_file(str(directory / PEFT_WEIGHTS))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise AdapterError(f"{directory} is not a readable PEFT LoRA adapter: {exc}") from None
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise AdapterError(
            f"{directory}: only plain LoRA is supported (not DoRA or other PEFT types)"
        )
    if (
        config.get("rank_pattern")
        or config.get("alpha_pattern")
        or config.get("bias", "none") != "none"
    ):
        raise AdapterError(f"{directory}: per-module ranks, alphas or biases are not supported")
    rank = int(config["r"])
    alpha = float(config["lora_alpha"]) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        ours = _our_module(m.group(1)) if m else None
        if ours is None:
            raise AdapterError(f"{directory}: tensor {key!r} is not LoRA on a llama projection")
        halves.setdefault(ours, {})[m.group(2)] = tensor.to(torch.bfloat16)  # type: ignore[union-attr]
    pairs = {}
    for path, half in sorted(halves.items()):
        if set(half) != {"A", "B"}:
            raise AdapterError(f"{directory}: {path} needs both lora_A and lora_B")
        pairs[path] = (half["A"], half["B"])
    targets = tuple(
        t
        for t in ("q", "k", "v", "o", "gate", "up", "down")
        if any(p.endswith(f".{t}") for p in pairs)
    )
    layer_ids = sorted({int(p.split(".")[1]) for p in pairs})
    lora = LoraConfig(rank=rank, alpha=alpha, targets=targets, layers=tuple(layer_ids))
    return LoraAdapter(check_adapter_name(name), lora, pairs, {"imported_from": "peft"})
