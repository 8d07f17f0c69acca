"""The compressed model on disk and in memory.

A directory holding `config.json` (the architecture), `weights.safetensors` (packed indices,
lookup tables and row scales of every palettized projection, the int8 embedding and its scales,
the norms), `compression.json` (bits and group of every tensor, bits per weight with and
without the embedding, how it was made), the tokenizer, and optionally `recovery/` (the
accuracy-recovery adapter, attached by default).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from openafm.files import sha256_file
from openafm.io.hf_checkpoint import CONFIG_FILE
from openafm.model import ModelConfig, Transformer
from openafm.model.compressed import Int8Embedding, Int8Rows, PalettizedWeight
from openafm.model.linear import Linear

COMPRESSION_FILE = "compression.json"
WEIGHTS_FILE = "weights.safetensors"
RECOVERY_DIR = "recovery"
FORMAT_VERSION = 1


class CompressedModelError(ValueError):
    """A compressed-model directory that is incomplete or inconsistent."""


def is_compressed_dir(path: Path) -> bool:
    return path.is_dir() and (path / COMPRESSION_FILE).exists()


def quantize_embedding(model: Transformer) -> None:
    """8-bit embedding (one scale per token row), shared with the output head when tied."""
    table = Int8Rows.quantize(model.embed.weight.detach().float())
    model.embed = Int8Embedding(table, model.dtype)
    if model.config.tie_embeddings:
        model.output.compress(table)


@dataclass(frozen=True)
class TensorEntry:
    """How one projection is stored."""

    bits: int
    group_size: int
    row_scale: bool
    weights: int
    storage_bits: int


def tensor_entries(model: Transformer) -> dict[str, TensorEntry]:
    entries = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and isinstance(module.compressed, PalettizedWeight):
            pw = module.compressed
            entries[name] = TensorEntry(
                pw.bits,
                pw.group_size,
                pw.scale is not None,
                pw.in_features * pw.out_features,
                pw.storage_bits(),
            )
    return entries


def bits_summary(model: Transformer) -> dict[str, float | int]:
    """Bits per weight over the block projections (`bpw`) and over every weight (`bpw_total`).

    `bpw` counts what the projections store (indices, tables and scales when palettized, the
    dense dtype otherwise); `bpw_total` counts every stored tensor (embedding and its scales,
    norms) over every weight of the model, the tied head counted once.
    """
    weights = stored = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.startswith("layers."):
            weights += module.in_features * module.out_features
            if isinstance(module.compressed, PalettizedWeight):
                stored += module.compressed.storage_bits()
            else:
                stored += module.weight.numel() * module.weight.element_size() * 8
    palettized = sum(e.weights for e in tensor_entries(model).values())
    total_bits, total_weights = 0, palettized
    for name, tensor in _unique_tensors(model).items():
        total_bits += tensor.numel() * tensor.element_size() * 8
        if name.endswith((".scale", ".lut")) or "compressed.indices" in name:
            continue
        total_weights += tensor.numel()
    return {
        "bpw": stored / weights,
        "bpw_total": total_bits / total_weights,
        "projection_weights": weights,
        "total_weights": total_weights,
        "bytes": total_bits // 8,
    }


def _unique_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Every stored tensor once (the tied head's entries are the embedding's)."""
    state = model.state_dict()
    tied = model.config.tie_embeddings
    return {name: t for name, t in state.items() if not (tied and name.startswith("output."))}


def save_compressed(
    model: Transformer,
    out: str | Path,
    *,
    made_with: Mapping[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the directory atomically (a crash leaves no half-written model).

    `write_extra(staging_dir)` adds files (the tokenizer, an adapter) before the directory
    takes its place.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        tensors = {n: t.contiguous() for n, t in _unique_tensors(model).items()}
        save_file(tensors, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            **bits_summary(model),
            "tensors": {n: vars(e) for n, e in tensor_entries(model).items()},
            "embedding": "int8" if isinstance(model.embed, Int8Embedding) else "dense",
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "made_with": dict(made_with),
        }
        (tmp / COMPRESSION_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_compression_meta(path: str | Path) -> dict[str, Any]:
    """`compression.json`, with the fields a load relies on checked."""
    path = Path(path)
    where = path / COMPRESSION_FILE
    try:
        meta = json.loads(where.read_text())
    except FileNotFoundError:
        raise CompressedModelError(
            f"{path}: no {COMPRESSION_FILE} (not a compressed model)"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressedModelError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        raise CompressedModelError(f"{where}: 'tensors' must map projections to their storage")
    for name, entry in meta["tensors"].items():
        if not (
            isinstance(entry, dict)
            and _positive_int(entry.get("bits"))
            and _positive_int(entry.get("group_size"))
            and isinstance(entry.get("row_scale"), bool)
        ):
            raise CompressedModelError(
                f"{where}: {name} needs positive integer bits and group_size, and row_scale"
            )
    return meta


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def load_compressed(path: str | Path, *, verify: bool = True) -> Transformer:
    """Rebuild the compressed model (no dense copy of any compressed weight is made)."""
    path = Path(path)
    meta = read_compression_meta(path)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).exists():
            raise CompressedModelError(f"{path}: {required} is missing")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CompressedModelError(
            f"{path}: format version {meta.get('format_version')}, this OpenAFM reads"
            f" {FORMAT_VERSION}"
        )
    if verify and sha256_file(path / WEIGHTS_FILE) != meta.get("weights_sha256"):
        raise CompressedModelError(
            f"{path / WEIGHTS_FILE} does not match the checksum in {COMPRESSION_FILE}"
            " (changed or damaged)"
        )
    config = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    tensors = load_file(path / WEIGHTS_FILE)
    with torch.device("meta"):
        model = Transformer(config)
    modules = dict(model.named_modules())
    try:
        for name, entry in meta["tensors"].items():
            module = modules.get(name)
            if not isinstance(module, Linear):
                raise CompressedModelError(f"{path}: {name} is not a projection of this model")
            prefix = f"{name}.compressed."
            module.compress(
                PalettizedWeight(
                    tensors.pop(prefix + "indices"),
                    tensors.pop(prefix + "lut"),
                    tensors.pop(prefix + "scale", None) if entry["row_scale"] else None,
                    bits=entry["bits"],
                    group_size=entry["group_size"],
                    in_features=module.in_features,
                )
            )
        if meta.get("embedding") == "int8":
            table = Int8Rows(tensors.pop("embed.table.values"), tensors.pop("embed.table.scale"))
            model.embed = Int8Embedding(table, torch.float32)
            if config.tie_embeddings:
                model.output.compress(table)
        model.load_state_dict(tensors, strict=False, assign=True)
    except KeyError as exc:
        raise CompressedModelError(f"{path / WEIGHTS_FILE}: tensor {exc} is missing") from None
    except (RuntimeError, ValueError) as exc:
        raise CompressedModelError(f"{path / WEIGHTS_FILE}: {exc}") from None
    missing = [n for n, t in _unique_tensors(model).items() if t.is_meta]
    if missing:
        raise CompressedModelError(f"{path / WEIGHTS_FILE}: tensors missing: {missing[:3]}")
    model.tie_weights()
    model.rope.reset(torch.device("cpu"))
    return model.eval().requires_grad_(False)
