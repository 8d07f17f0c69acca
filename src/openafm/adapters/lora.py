"""LoRA adapters: low-rank updates to chosen projections of a frozen base, kept unmerged.

An adapter holds, for each targeted projection `layers.N.attn.q` … `layers.N.mlp.down`, a pair
A (rank x in) and B (out x rank); the projection computes `x Wᵀ + (alpha / rank)·(x Aᵀ) Bᵀ`
through the model's one linear seam (`Linear.delta`). B starts at zero, so a fresh adapter
reproduces the base exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from openafm.model import Linear, LowRankDelta, Transformer

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
"""Projections an adapter may target: attention q/k/v/o and the SwiGLU gate/up/down."""

_BLOCK_OF = {"q": "attn", "k": "attn", "v": "attn", "o": "attn"} | dict.fromkeys(
    ("gate", "up", "down"), "mlp"
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterError(ValueError):
    """An adapter is malformed, or does not fit the base it is used with."""


def check_adapter_name(name: str) -> str:
    """Adapter names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
            " (starting with a letter or digit, no '..')"
        )
    return name


@dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling and placement of an adapter (`layers=None`: every layer)."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise AdapterError(f"alpha must be positive, got {self.alpha!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise AdapterError(
                f"unknown targets {unknown or '(none)'}: choose among {', '.join(TARGETS)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise AdapterError(f"targets repeat: {list(self.targets)}")
        if self.layers is not None and (
            not self.layers or len(set(self.layers)) != len(self.layers)
        ):
            raise AdapterError(f"layers must be distinct and non-empty, got {self.layers!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        layers = tuple(range(n_layers)) if self.layers is None else self.layers
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise AdapterError(f"layers {bad} do not exist in a base with {n_layers} layers")
        return layers

    def to_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "layers": None if self.layers is None else list(self.layers),
        }


def module_path(layer: int, target: str) -> str:
    """The seam an adapter pair attaches to, e.g. `layers.3.attn.q`."""
    return f"layers.{layer}.{_BLOCK_OF[target]}.{target}"


def target_modules(model: Transformer, config: LoraConfig) -> dict[str, Linear]:
    """The model's projections an adapter with `config` targets, by module path."""
    modules = dict(model.named_modules())
    out = {}
    for layer in config.layer_ids(model.config.n_layers):
        for target in config.targets:
            path = module_path(layer, target)
            module = modules[path]
            assert isinstance(module, Linear)
            if config.rank > min(module.in_features, module.out_features):
                raise AdapterError(
                    f"rank {config.rank} exceeds the width of {path}"
                    f" ({module.out_features}x{module.in_features})"
                )
            out[path] = module
    return out


@dataclass
class LoraAdapter:
    """A named adapter: its config and one (A, B) pair per targeted module path."""

    name: str
    config: LoraConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metadata: dict[str, object] = field(default_factory=dict)

    @classmethod
    def fresh(
        cls, name: str, model: Transformer, config: LoraConfig, *, seed: int = 0
    ) -> LoraAdapter:
        """A trainable adapter: A with PEFT's Kaiming-uniform init, B zero (output = base)."""
        gen = torch.Generator().manual_seed(seed)
        pairs = {}
        for path, module in target_modules(model, config).items():
            bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5))
            a = (torch.rand(config.rank, module.in_features, generator=gen) * 2 - 1) * bound
            b = torch.zeros(module.out_features, config.rank)
            pairs[path] = (nn.Parameter(a), nn.Parameter(b))
        return cls(check_adapter_name(name), config, pairs)

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.pairs.values() for t in pair]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())

    def check_fits(self, model: Transformer) -> None:
        """Raise `AdapterError` unless every pair matches a targeted projection of `model`."""
        modules = target_modules(model, self.config)
        if set(modules) != set(self.pairs):
            missing = sorted(set(modules) - set(self.pairs))[:3]
            extra = sorted(set(self.pairs) - set(modules))[:3]
            raise AdapterError(
                f"adapter {self.name!r} does not match its config (missing {missing}, extra {extra})"
            )
        for path, (a, b) in self.pairs.items():
            module = modules[path]
            want_a = (self.config.rank, module.in_features)
            want_b = (module.out_features, self.config.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterError(
                    f"adapter {self.name!r}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)},"
                    f" expected {want_a} and {want_b}"
                )

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        """A detached copy with tensors in `dtype` (for inference); it shares no storage, so
        training the original leaves the copy as it was (an RL reference)."""
        pairs = {
            p: (
                a.detach().to(dtype, copy=True).contiguous(),
                column_major(b.detach().to(dtype, copy=True)),
            )
            for p, (a, b) in self.pairs.items()
        }
        return LoraAdapter(self.name, self.config, pairs, dict(self.metadata))

    def attach(self, model: Transformer) -> None:
        """Overlay this adapter on `model` (replacing any other); the base weights are untouched."""
        self.check_fits(model)
        scale = self.config.scale
        set_deltas(model, {path: LowRankDelta(a, b, scale) for path, (a, b) in self.pairs.items()})


def column_major(b: torch.Tensor) -> torch.Tensor:
    """B (out, rank) stored column-major (its transpose contiguous), for inference: the native
    kernels then add the update a vector of output rows at a time instead of one short dot
    product per row; PyTorch takes either layout."""
    return b.t().contiguous().t()


def set_deltas(model: Transformer, deltas: Mapping[str, LowRankDelta]) -> None:
    """Put each delta on the seam its module path names; every other seam gets none."""
    detach(model)
    modules = dict(model.named_modules())
    for path, delta in deltas.items():
        module = modules[path]
        assert isinstance(module, Linear)
        module.delta = delta


def detach(model: Transformer) -> None:
    """Remove every adapter from `model`: it computes the plain base again."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.delta = None
