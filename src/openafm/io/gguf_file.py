"""Read (and, for tests and llama.cpp export, write) llama-family GGUF checkpoints.

llama.cpp's converter permutes the rows of the Q and K projections so its RoPE can rotate
adjacent (even, odd) pairs; we undo that on read (and redo it on write), so our model keeps the
Hugging Face "rotate half" layout. Quantized tensors are dequantized with the `gguf` package.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from openafm.io.errors import CheckpointError

if TYPE_CHECKING:  # `gguf` is imported where it is used: models in other formats do not need it
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from openafm.io.names import convert_name
from openafm.model import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass
class Checkpoint:
    """A model's config and its tensors under our names, plus where they came from."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    source: Path
    format: str
    tensor_types: dict[str, str]


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _permute_rows(w: np.ndarray, n_head: int, inverse: bool) -> np.ndarray:
    """llama.cpp's Q/K row permutation (`inverse=True` restores the Hugging Face order)."""
    rows = w.shape[0]
    if inverse:
        return (
            w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        )
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(name: str, config: ModelConfig) -> int:
    """Head count whose rows llama.cpp permutes in this tensor (0 for tensors it leaves alone)."""
    if name.endswith("attn.q.weight"):
        return config.n_heads
    if name.endswith("attn.k.weight"):
        return config.n_kv_heads
    return 0


def open_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file, turning every low-level failure into one clear `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError, struct errors, IndexError, ...
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc})") from None


def _float32_value(x: float) -> float:
    """GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06; take the shortest decimal."""
    return float(f"{float(x):.7g}")


def gguf_config(reader: GGUFReader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    names = {t.name for t in reader.tensors}
    dim = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{path}: no vocabulary size in the metadata")
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(_field(reader, f"{arch}.block_count")),
            n_heads=n_heads,
            n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
            ffn_dim=int(_field(reader, f"{arch}.feed_forward_length")),
            head_dim=int(_field(reader, f"{arch}.attention.key_length", dim // n_heads)),
            norm_eps=_float32_value(
                _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
            ),
            rope_theta=_float32_value(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
            max_seq_len=int(_field(reader, f"{arch}.context_length", 2048)),
            tie_embeddings="output.weight" not in names,
            qk_norm="blk.0.attn_q_norm.weight" in names,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete or invalid model metadata ({exc})") from None


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Dequantize every tensor of a llama-family GGUF file into our names and layout."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        name = convert_name(t.name, "gguf", "ours")
        if name is None:
            if t.name.startswith("rope_freqs"):
                continue  # llama.cpp's precomputed RoPE scaling factors; unused without rope scaling
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r}")
        try:
            array = dequantize(t.data, t.tensor_type)
        except (NotImplementedError, KeyError) as exc:
            raise CheckpointError(
                f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name} ({exc})"
            ) from None
        array = np.asarray(array, dtype=np.float32)
        if not array.flags.writeable:  # unquantized tensors are views of the read-only memmap
            array = array.copy()
        if heads := _rope_heads(name, config):
            array = _permute_rows(array, heads, inverse=True)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        types[name] = t.tensor_type.name
    return Checkpoint(config, tensors, path, "gguf", types)


QuantChoice = Callable[[str, torch.Tensor], "GGMLQuantizationType"]


def _default_quant(name: str, tensor: torch.Tensor) -> GGMLQuantizationType:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType.F32


def write_gguf(
    path: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    quant: QuantChoice = _default_quant,
    metadata: Mapping[str, Any] | None = None,
    tokenizer: Mapping[str, Any] | None = None,
) -> Path:
    """Write a llama GGUF file (atomically) that llama.cpp and `read_gguf` can load.

    `quant(name, tensor)` picks each tensor's type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ...; the
    types the `gguf` package can quantize). `tokenizer` holds optional `tokens`, `merges`,
    `token_types`, `model`, `pre`, `bos_token_id`, `eos_token_id` and `chat_template`.
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(tmp, "llama")
    writer.add_name(str((metadata or {}).get("name", "openafm")))
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer:
        _add_tokenizer(writer, tokenizer)
    for name, tensor in tensors.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        gguf_name = convert_name(name, "ours", "gguf")
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {name!r}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if heads := _rope_heads(name, config):
            array = _permute_rows(array, heads, inverse=False)
        qtype = quant(name, tensor) if array.ndim == 2 else GGMLQuantizationType.F32
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _add_tokenizer(writer: GGUFWriter, tok: Mapping[str, Any]) -> None:
    writer.add_tokenizer_model(tok.get("model", "gpt2"))
    if "pre" in tok:
        writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(list(tok["tokens"]))
    if "token_types" in tok:
        writer.add_token_types(list(tok["token_types"]))
    if "merges" in tok:
        writer.add_token_merges(list(tok["merges"]))
    if "bos_token_id" in tok:
        writer.add_bos_token_id(int(tok["bos_token_id"]))
    if "eos_token_id" in tok:
        writer.add_eos_token_id(int(tok["eos_token_id"]))
    if "chat_template" in tok:
        writer.add_chat_template(tok["chat_template"])
