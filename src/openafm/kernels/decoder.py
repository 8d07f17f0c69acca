"""The decoder layers of a palettized model as one native call per forward.

A decode step of the module-by-module model makes about forty small PyTorch calls per layer;
their dispatch and Python overhead was half of the step's time once the products were native.
`DecoderStack` is built once from the layers' tensors (norm weights, palettized projections in
the kernels' layout, LoRA factors) and runs every layer of one sequence's new tokens (1-16:
decode, speculative verification) against a float32 KV cache in one call. `reference.
decoder_stack` computes the same in PyTorch; it is the fallback and what the tests hold the
native class to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openafm.kernels import reference

LutWeight = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int, int]
Lora = tuple[torch.Tensor, torch.Tensor, float]
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
STAGES = ("norms", "projections", "rope_and_cache", "attention", "activation")


@dataclass(frozen=True)
class StackProjection:
    """A palettized weight (planes, tables, scale, bits, group, out_features), its LoRA and
    its int8 tables (see `kernels.int8_tables`), if any."""

    weight: LutWeight
    lora: Lora | None = None
    int8_tables: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class StackLayer:
    """One decoder layer's tensors; `projections` in the order of `PROJECTIONS`."""

    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    projections: tuple[StackProjection, ...]
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class StackShape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float


class DecoderStack:
    """`layers` as one call: `stack(h, keys, values, pos, cos, sin)` → hidden states.

    `h` (T, dim) float32 are the new tokens' embeddings; `keys`, `values` (layers, 1, kv_heads,
    max_len, head_dim) the float32 cache, written at positions `pos`..`pos+T-1`; `cos`, `sin`
    (T, head_dim) the rotary tables at those positions. `native=False` computes with the
    PyTorch reference.
    """

    def __init__(
        self,
        layers: list[StackLayer],
        shape: StackShape,
        *,
        native: bool = True,
        isa: int = 0,
    ) -> None:
        self.layers = layers
        self.shape = shape
        self._native = _build(layers, shape, isa) if native else None

    def __call__(
        self,
        h: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        pos: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        if self._native is not None:
            return self._native.forward(h, keys, values, pos, cos, sin)
        return reference.decoder_stack(h, self.layers, self.shape, keys, values, pos, cos, sin)

    def profile(self, on: bool) -> None:
        """Start (resetting) or stop timing the native stages (see `timings`)."""
        if self._native is not None:
            self._native.profile(on)

    def timings(self) -> dict[str, float]:
        """Seconds spent per stage while profiling (empty for the reference)."""
        if self._native is None:
            return {}
        return {k: ns / 1e9 for k, ns in zip(STAGES, self._native.timings(), strict=True)}


def _build(layers: list[StackLayer], shape: StackShape, isa: int) -> object:
    qk_norm = layers[0].q_norm is not None
    tensors: list[torch.Tensor] = []
    ints = [len(layers), shape.heads, shape.kv_heads, shape.head_dim, int(qk_norm), isa]
    floats = [shape.eps]
    for layer in layers:
        tensors += [layer.attn_norm, layer.mlp_norm]
        if qk_norm:
            assert layer.q_norm is not None and layer.k_norm is not None
            tensors += [layer.q_norm, layer.k_norm]
        for projection in layer.projections:
            planes, tables, scale, bits, group, out_features = projection.weight
            lora, tables8 = projection.lora, projection.int8_tables
            ints += [bits, group, out_features]
            ints += [int(scale is not None), int(lora is not None), int(tables8 is not None)]
            tensors += [planes, tables]
            if scale is not None:
                tensors.append(scale)
            if lora is not None:
                tensors += lora[:2]
            if tables8 is not None:
                tensors += tables8
            floats.append(1.0 if projection.lora is None else projection.lora[2])
    return torch.classes.openafm.DecoderStack(tensors, ints, floats)
