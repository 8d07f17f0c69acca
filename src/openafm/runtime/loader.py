"""Load a model and its tokenizer by name or path, converting GGUF once into a fast-loading cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openafm.adapters import check_base, load_adapter
from openafm.io import (
    Checkpoint,
    build_model,
    model_signature,
    openafm_home,
    read_checkpoint,
    resolve_model,
    write_hf,
)
from openafm.io.compressed_checkpoint import (
    RECOVERY_DIR,
    is_compressed_dir,
    load_compressed,
    read_compression_meta,
)
from openafm.io.hf_checkpoint import CONFIG_FILE
from openafm.model import Transformer
from openafm.model.compressed import adapter_dtype, repack_for_kernels
from openafm.runtime.adapter_cache import DEFAULT_BUDGET_BYTES, AdapterCache
from openafm.runtime.engine import Engine
from openafm.runtime.speculative import Drafter
from openafm.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("openafm")


@dataclass
class Pretrained:
    model: Transformer
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    path: Path  # what the user named (resolved), not the conversion cache
    default_adapter: Path | None = None  # applied when a request names none (recovery adapter)
    _signature: str | None = field(default=None, repr=False)

    def signature(self) -> str:
        """The base's signature (hash of config and weights), computed once on first use.

        A model built from a shipped recipe carries the recipe's signature instead: the same
        model on every CPU, whatever its last bits (see `openafm.compress.default_model`).
        """
        if self._signature is None:
            self._signature = model_signature(self.model.config, self.model.state_dict())
        return self._signature


def _converted_dir(gguf: Path) -> Path:
    """Where a GGUF file's safetensors conversion lives, keyed by the file's identity."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return openafm_home() / "converted" / f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path, target: Path) -> Checkpoint:
    """Dequantize a GGUF once and keep it as a Hugging Face directory (loads in a fraction of the time)."""
    checkpoint = read_checkpoint(gguf)
    tokenizer = Tokenizer.from_gguf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        extra = {"source": gguf.name, "source_tensor_types": checkpoint.tensor_types}
        write_hf(tmp, checkpoint.config, checkpoint.tensors, extra_config=extra)
        tokenizer.save(tmp)
        os.replace(tmp, target)
    except OSError as exc:  # a read-only or full cache must not stop generation
        log.warning("could not cache the converted model in %s (%s)", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return checkpoint


def _tokenizer_source(path: Path) -> Path:
    """Where to read a tokenizer for `path`: its converted cache when one exists (fast)."""
    if path.is_file():
        converted = _converted_dir(path)
        if (converted / "tokenizer.json").exists():
            return converted
    return path


def load_tokenizer_for(name_or_path: str | Path | None = None) -> Tokenizer:
    """Only the tokenizer of a model (known name, GGUF file or directory)."""
    return load_tokenizer(_tokenizer_source(resolve_model(name_or_path)))


def load_pretrained(
    name_or_path: str | Path | None = None, *, use_cache: bool = True
) -> Pretrained:
    """Model + tokenizer from a known name (fetched on first use), a GGUF file, or a HF directory."""
    path = resolve_model(name_or_path)
    if is_compressed_dir(path):
        return _load_compressed(path)
    source = path
    if path.is_dir() and not (path / CONFIG_FILE).exists():
        ggufs = sorted(path.glob("*.gguf"))
        source = ggufs[0] if len(ggufs) == 1 else path
    if use_cache and source.is_file():
        converted = _converted_dir(source)
        if (converted / CONFIG_FILE).exists():
            checkpoint = read_checkpoint(converted)
            tokenizer = load_tokenizer(converted)
            saved = json.loads((converted / CONFIG_FILE).read_text())
            checkpoint.format = "gguf"
            checkpoint.tensor_types = saved.get("source_tensor_types", checkpoint.tensor_types)
        else:
            checkpoint = _convert_gguf(source, converted)
            tokenizer = Tokenizer.from_gguf(source)
        checkpoint.source = source
    else:
        checkpoint = read_checkpoint(source)
        tokenizer = load_tokenizer(source)
    return Pretrained(build_model(checkpoint), tokenizer, checkpoint, path)


def _load_compressed(path: Path) -> Pretrained:
    """A compressed model; its recovery adapter, when it has one, is attached by default."""
    model = load_compressed(path)
    meta = read_compression_meta(path)
    checkpoint = Checkpoint(
        model.config,
        {},
        path,
        "palettized",
        {name: f"lut{entry['bits']}" for name, entry in meta["tensors"].items()},
    )
    recovery = path / RECOVERY_DIR
    pretrained = Pretrained(
        model,
        load_tokenizer(path),
        checkpoint,
        path,
        recovery if recovery.is_dir() else None,
        meta.get("made_with", {}).get("signature"),
    )
    if pretrained.default_adapter is not None:
        adapter = load_adapter(pretrained.default_adapter)
        check_base(adapter, pretrained.signature())
        adapter.check_fits(model)
        adapter.to(adapter_dtype(model)).attach(model)
    repack_for_kernels(model)
    return pretrained


def engine_for(
    pretrained: Pretrained,
    *,
    prefill_dtype: torch.dtype = torch.float32,
    adapter_budget_bytes: int = DEFAULT_BUDGET_BYTES,
    force_adapters: bool = False,
    speculation: Drafter | None = None,
) -> Engine:
    """An engine over a loaded model, with an adapter cache bound to the model's signature."""
    cache = AdapterCache(
        pretrained.model,
        pretrained.signature,
        budget_bytes=adapter_budget_bytes,
        force=force_adapters,
        default=None if pretrained.default_adapter is None else str(pretrained.default_adapter),
    )
    return Engine(
        pretrained.model,
        pretrained.tokenizer,
        prefill_dtype=prefill_dtype,
        adapters=cache,
        speculation=speculation,
    )
