"""Decode steps of a palettized model through `kernels.DecoderStack`: every layer in one call.

`stack_for(model, h, cache)` returns the stack when a forward can use it, else None and the
layers run module by module (their result is the reference the tests hold the stack to). It
applies to inference (`torch.inference_mode`) on the CPU of one sequence's 1-16 new tokens with
a float32 cache and no padding, when every projection is palettized in a width the kernels
support, every adapter update can be fused (one LoRA for the batch, float32 or bfloat16
factors), and no module has hooks. The stack is built on first use and rebuilt whenever a
weight, an adapter or a norm of the model changes (checked by identity on every call: about
0.1 ms here). The modules themselves are listed once: code that replaces a layer's modules
after decoding must drop the plan (`model.__dict__.pop(PLAN_ATTRIBUTE)`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from openafm import kernels
from openafm.kernels.decoder import DecoderStack, StackLayer, StackProjection, StackShape
from openafm.model.compressed import PalettizedWeight
from openafm.model.kv_cache import KVCache
from openafm.model.linear import Linear
from openafm.model.norm import RMSNorm

if TYPE_CHECKING:
    from openafm.model.transformer import Transformer

PLAN_ATTRIBUTE = "_native_decode_plan"  # where a model keeps its plan (a plain attribute)
_DELTA = operator.attrgetter("delta")


@dataclass
class _Plan:
    hooks: list[dict]  # the forward (pre-)hook dicts of every module of the layers
    linears: list[Linear]
    norms: list[RMSNorm]
    signature: list[object]
    stack: DecoderStack | None


def stack_for(model: Transformer, h: torch.Tensor, cache: KVCache | None) -> DecoderStack | None:
    """The native stack for this forward of `model` on embeddings `h` (1, T, dim), or None."""
    if cache is None or not _fits(h, cache):
        return None
    plan: _Plan | None = model.__dict__.get(PLAN_ATTRIBUTE)
    if plan is None:
        modules = [m for layer in model.layers for m in layer.modules()]
        linears = [m for m in modules if isinstance(m, Linear)]
        norms = [m for m in modules if isinstance(m, RMSNorm)]
        hooks = [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules]
        plan = _Plan(hooks, linears, norms, [], None)
        model.__dict__[PLAN_ATTRIBUTE] = plan
    if any(map(len, plan.hooks)):
        return None
    signature = _signature(plan)
    if not _same(signature, plan.signature):
        plan.stack = _build(model, h)
        plan.signature = _signature(plan)  # building repacks weights: new planes
    return plan.stack


def _same(new: list[object], old: list[object]) -> bool:
    """Identical entries, or equal numbers and names (a new overlay's scales, the mode)."""
    if len(new) != len(old):
        return False
    return all(map(operator.is_, new, old)) or all(
        a is b or (type(a) in (float, str) and a == b) for a, b in zip(new, old, strict=True)
    )


def _fits(h: torch.Tensor, cache: KVCache) -> bool:
    return (
        h.dim() == 3
        and h.shape[0] == 1
        and 1 <= h.shape[1] <= kernels.MAX_KERNEL_ROWS
        and h.dtype == torch.float32
        and h.device.type == "cpu"
        and cache.dtype == torch.float32
        and cache.pad is None
        and cache.batch_size == 1
        and (cache.keys is None or cache.keys.is_contiguous())  # not a slot cache's row view
        and torch.is_inference_mode_enabled()
        and not torch.jit.is_tracing()
        and not torch.is_autocast_enabled("cpu")
        and kernels.native()
    )


def _signature(plan: _Plan) -> list[object]:
    """Everything the stack was built from, compared by identity (numbers by value). An
    adapter's factors, not its `LowRankDelta`, so a new overlay of the same adapter for each
    request keeps the stack. (Submodules, buffers and parameters are read from their dicts:
    `nn.Module.__getattr__` made this check cost a millisecond.)"""
    deltas = list(map(_DELTA, plan.linears))
    weights = [linear._modules.get("compressed") for linear in plan.linears]
    out: list[object] = [None if d is None else d.a for d in deltas]
    out += [None if d is None else d.b for d in deltas]
    out += [None if d is None else d.scale for d in deltas]
    out += weights
    out += [None if w is None else w._buffers.get("planes") for w in weights]
    out += [getattr(w, "dense_cache", None) for w in weights]
    out += [norm._parameters.get("weight") for norm in plan.norms]
    out.append(kernels.mode())  # `fast` computes 4-bit products with int8 tables
    return out


def _build(model: Transformer, h: torch.Tensor) -> DecoderStack | None:
    """The stack for `model`'s layers, or None if any part needs the module path."""
    from openafm.model.transformer import MLP, Attention, Block

    if any(
        (type(layer), type(layer.attn), type(layer.mlp)) != (Block, Attention, MLP)
        for layer in model.layers
    ):
        return None
    layers = []
    norms = [norm for layer in model.layers for norm in _norms(layer)]
    if not all(_plain_norm(n) for n in norms) or len({n.eps for n in norms}) != 1:
        return None
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        linears = (attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down)
        projections = [_projection(linear, h) for linear in linears]
        if any(p is None for p in projections):
            return None
        layers.append(
            StackLayer(
                attn_norm=layer.attn_norm.weight,
                mlp_norm=layer.mlp_norm.weight,
                projections=tuple(p for p in projections if p is not None),
                q_norm=None if attn.q_norm is None else attn.q_norm.weight,
                k_norm=None if attn.k_norm is None else attn.k_norm.weight,
            )
        )
    config = model.config
    eps = norms[0].eps or torch.finfo(torch.float32).eps
    shape = StackShape(config.n_heads, config.n_kv_heads, config.head_dim, eps)
    return DecoderStack(layers, shape)


def _norms(layer: nn.Module) -> list[nn.Module]:
    norms = [layer.attn_norm, layer.mlp_norm]
    if layer.attn.q_norm is not None or layer.attn.k_norm is not None:
        norms += [layer.attn.q_norm, layer.attn.k_norm]
    return norms


def _plain_norm(norm: nn.Module | None) -> bool:
    weight = getattr(norm, "weight", None)
    return (
        type(norm) is RMSNorm
        and type(weight) in (torch.Tensor, nn.Parameter)
        and weight.dtype == torch.float32
        and weight.is_contiguous()
    )


def _projection(linear: nn.Module, h: torch.Tensor) -> StackProjection | None:
    weight = getattr(linear, "compressed", None)
    if type(linear) is not Linear or linear.bias is not None:
        return None
    if not isinstance(weight, PalettizedWeight):
        return None
    plan = weight.native_product(h, linear.delta)
    if plan is None:
        return None
    args, lora, tables8 = plan
    if linear.delta is not None and lora is None:  # an update the kernel cannot add
        return None
    return StackProjection(args, lora, tables8)
