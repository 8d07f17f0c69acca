"""Core ML export: the compressed model as an `.mlpackage` whose weights stay palettized.

coremltools converts a traced PyTorch model; a weight that carries compression info
(`_COREML_/weight/...` buffers: lookup table, per-row scale, compression type) becomes a
`constexpr_lut_to_dense` op over the packed indices instead of a dense constant, and the int8
embedding becomes `constexpr_blockwise_shift_scale`. So the export twin holds each compressed
weight densely only while converting, with its exact tables beside it; the converter recovers
the indices (exactly, the values are table entries) and writes the tables. The recovery adapter
stays attached as small float16 low-rank products. The package runs on iOS 18 / macOS 15 or
later; converting works on Linux, running it needs macOS, so it is checked here by reading its
program (ops and weight bytes), not by predicting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openafm.model import LowRankDelta, Transformer
from openafm.model.compressed import Int8Embedding, Int8Rows, PalettizedWeight
from openafm.model.linear import Linear

_PREFIX = "_COREML_"
_PALETTIZATION, _QUANTIZATION = 2, 3


class CoreMLExportError(RuntimeError):
    """coremltools is missing or could not convert the model."""


@dataclass(frozen=True)
class PackageSummary:
    """What a converted package holds."""

    lut_ops: int
    int8_ops: int
    dense_consts: int
    weight_bytes: int
    ops: int


def _dense_twin(model: Transformer) -> nn.Module:
    """A float32 copy whose compressed weights are dense, each with its compression info."""
    with torch.device("meta"):
        twin = Transformer(model.config)
    twin.to_empty(device="cpu")
    twin.load_state_dict(
        {
            k: v
            for k, v in model.state_dict().items()
            if ".compressed." not in k and "embed." not in k
        },
        strict=False,
    )
    source = dict(model.named_modules())
    for name, module in twin.named_modules():
        if not isinstance(module, Linear) or (
            module is twin.output and model.config.tie_embeddings
        ):
            continue  # a tied head is the embedding, tied below
        original = source[name]
        assert isinstance(original, Linear)
        module.weight = nn.Parameter(original.dense_weight().float(), requires_grad=False)
        if original.delta is not None:
            d = original.delta
            module.delta = LowRankDelta(d.a.detach().float(), d.b.detach().float(), d.scale)
        compressed = original.compressed
        if isinstance(compressed, PalettizedWeight):
            groups, k = compressed.lut.shape
            module.register_buffer(
                f"{_PREFIX}/weight/lut", compressed.lut.float().view(groups, 1, k, 1)
            )
            if compressed.scale is not None:
                module.register_buffer(
                    f"{_PREFIX}/weight/palettization_scale",
                    compressed.scale.float().view(-1, 1),
                )
            module.register_buffer(
                f"{_PREFIX}/weight/compression_type", torch.tensor([_PALETTIZATION])
            )
    if isinstance(model.embed, Int8Embedding):
        table: Int8Rows = model.embed.table
        embed = nn.Embedding(model.config.vocab_size, model.config.dim)
        embed.weight = nn.Parameter(table.dequantize(), requires_grad=False)
        embed.register_buffer(f"{_PREFIX}/weight/quantization_n_bits", torch.tensor(8))
        embed.register_buffer(
            f"{_PREFIX}/weight/quantization_scale", table.scale.float().view(-1, 1)
        )
        embed.register_buffer(f"{_PREFIX}/weight/compression_type", torch.tensor([_QUANTIZATION]))
        twin.embed = embed
    else:
        twin.embed.weight = nn.Parameter(model.embed.weight.detach().float(), requires_grad=False)
    twin.tie_weights()
    twin.rope.reset(torch.device("cpu"))
    return twin.eval().requires_grad_(False)


class _LogitsOf(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids.long())


@contextlib.contextmanager
def _plain_attention(repeat: int) -> Iterator[None]:
    """Trace attention with key/value heads repeated (the converter lacks `enable_gqa`).

    No arithmetic on shapes: traced, it would become tensor ops the converter rejects.
    """
    original = F.scaled_dot_product_attention

    def repeated(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False):
        if enable_gqa and repeat > 1:
            k = k[:, :, None].expand(-1, -1, repeat, -1, -1).flatten(1, 2)
            v = v[:, :, None].expand(-1, -1, repeat, -1, -1).flatten(1, 2)
        causal = bool(is_causal)
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal)

    F.scaled_dot_product_attention = repeated
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def export_coreml(model: Transformer, out: str | Path, *, seq_len: int = 128) -> PackageSummary:
    """Convert `model` (compressed, adapters attached) to `out` (`.mlpackage`), atomically.

    The program maps `input_ids` (1, seq_len) int32 to `logits` (1, seq_len, vocab) float16: a
    fixed-length causal pass (pad shorter prompts on the right and read the logits at the last
    real position: causal attention never looks right).
    """
    try:
        import coremltools as ct
    except ImportError as exc:
        raise CoreMLExportError(
            "Core ML export needs coremltools (pip install coremltools)"
        ) from exc
    out = Path(out)
    twin = _LogitsOf(_dense_twin(model))
    example = torch.zeros(1, seq_len, dtype=torch.int32)
    repeat = model.config.n_heads // model.config.n_kv_heads
    with torch.no_grad(), _plain_attention(repeat):
        traced = torch.jit.trace(twin, example, check_trace=False)
    try:
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name="input_ids", shape=(1, seq_len), dtype=np.int32)],
            outputs=[ct.TensorType(name="logits")],
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            convert_to="mlprogram",
        )
    except Exception as exc:  # the converter raises many types
        raise CoreMLExportError(f"coremltools could not convert the model: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        staged = tmp / out.name
        mlmodel.save(str(staged))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarize_package(out)


def summarize_package(path: str | Path) -> PackageSummary:
    """Count the ops of a package's program and the bytes of its weight file."""
    import coremltools as ct

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    ops: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return PackageSummary(
        lut_ops=ops.get("constexpr_lut_to_dense", 0),
        int8_ops=ops.get("constexpr_blockwise_shift_scale", 0),
        dense_consts=ops.get("const", 0),
        weight_bytes=weights.stat().st_size if weights.exists() else 0,
        ops=sum(ops.values()),
    )
