"""Resolve a model name or path, read its checkpoint, and build the `Transformer`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from openafm.io.errors import CheckpointError
from openafm.io.fetch import DEFAULT_MODEL, KNOWN_MODELS, fetch_model, is_cached, known_model
from openafm.io.gguf_file import Checkpoint, read_gguf
from openafm.io.hf_checkpoint import CONFIG_FILE, read_hf
from openafm.model import Transformer

log = logging.getLogger("openafm")


def resolve_model(name_or_path: str | Path | None = None) -> Path:
    """A checkpoint path: an existing file/directory, or a known model (fetched on first use)."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) in KNOWN_MODELS:
        model = known_model(str(name_or_path))
        if not is_cached(model):
            log.info("model %s is not in the cache yet: fetching it now (first use)", model.name)
        return fetch_model(model.name)
    raise CheckpointError(
        f"model {str(name_or_path)!r} not found: not a file or directory, and not a known name"
        f" (known: {', '.join(KNOWN_MODELS)})"
    )


def read_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a GGUF file, a Hugging Face directory, or a directory holding one GGUF file."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_FILE).exists():
            return read_hf(path, dtype)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return read_gguf(ggufs[0], dtype)
        raise CheckpointError(f"{path}: no {CONFIG_FILE} and not exactly one .gguf file inside")
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if path.suffix == ".gguf" or magic == b"GGUF":
        return read_gguf(path, dtype)
    raise CheckpointError(f"{path}: not a GGUF file or a Hugging Face model directory")


def build_model(checkpoint: Checkpoint) -> Transformer:
    """A `Transformer` holding the checkpoint's tensors (no random initialisation), in eval mode."""
    with torch.device("meta"):
        model = Transformer(checkpoint.config)
    try:
        model.load_weights(checkpoint.tensors)
    except RuntimeError as exc:  # missing/unexpected keys, shape mismatches
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{checkpoint.source}: tensors do not match the config ({first[-1]})"
        ) from None
    return model.eval().requires_grad_(False)


def load_model(name_or_path: str | Path | None = None) -> tuple[Transformer, Checkpoint]:
    checkpoint = read_checkpoint(resolve_model(name_or_path))
    return build_model(checkpoint), checkpoint
