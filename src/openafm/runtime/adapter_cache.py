"""Adapters at serving time: an LRU cache under a byte budget, and per-batch overlays.

An adapter is loaded once (checked against the base's signature and shapes, converted to the
dtype the model holds adapters in, `adapter_dtype`, with its scale folded into B) and kept
while it fits the budget. A batch names one adapter per row (or none); `overlay` turns that
into one `LowRankDelta` per projection: the adapter's own matrices when every row uses the
same one, otherwise matrices gathered per row (zeros for rows without an adapter). Swapping
is attribute assignment on the seams: nothing is rebuilt or recompiled.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from openafm.adapters import LoraAdapter, check_base, load_adapter, set_deltas
from openafm.adapters.lora import column_major
from openafm.adapters.registry import find_adapter
from openafm.model import Linear, LowRankDelta, Transformer
from openafm.model.compressed import adapter_dtype

DEFAULT_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ServingAdapter:
    """An adapter ready to overlay: per module path, A and scale·B in the model's adapter
    dtype (`adapter_dtype`)."""

    name: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @classmethod
    def from_adapter(cls, adapter: LoraAdapter, dtype: torch.dtype) -> ServingAdapter:
        scale = adapter.config.scale
        pairs = {
            path: (
                a.detach().to(dtype).contiguous(),
                column_major((b.detach().float() * scale).to(dtype)),
            )
            for path, (a, b) in adapter.pairs.items()
        }
        return cls(adapter.name, pairs, adapter.config.rank)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.pairs.values() for t in pair)


class AdapterCache:
    """Loaded adapters by name, least recently used evicted first once over `budget_bytes`."""

    def __init__(
        self,
        model: Transformer,
        signature: str | Callable[[], str],
        *,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        force: bool = False,
        resolve: Callable[[str], Path] = find_adapter,
        default: str | None = None,
    ) -> None:
        self.model = model
        self.default = default
        self._signature = signature
        self.budget_bytes = budget_bytes
        self.force = force
        self.resolve = resolve
        self.dtype = adapter_dtype(model)
        self._loaded: OrderedDict[str, ServingAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    @property
    def signature(self) -> str:
        """The base's signature (computed on the first adapter load when given lazily)."""
        if callable(self._signature):
            self._signature = self._signature()
        return self._signature

    def __contains__(self, name: str) -> bool:
        return name in self._loaded

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._loaded.values())

    def get(self, name: str) -> ServingAdapter:
        """The named adapter, loading it on a miss; errors leave the cache as it was."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        adapter = load_adapter(self.resolve(name))
        check_base(adapter, self.signature, force=self.force)
        adapter.check_fits(self.model)
        serving = ServingAdapter.from_adapter(adapter, self.dtype)
        if serving.nbytes > self.budget_bytes:
            raise ValueError(
                f"adapter {name!r} needs {serving.nbytes / 2**20:.1f} MiB, more than the cache"
                f" budget of {self.budget_bytes / 2**20:.1f} MiB"
            )
        with self._lock:
            self._loaded[name] = serving
            self.loads += 1
            while self.nbytes > self.budget_bytes:
                self._loaded.popitem(last=False)
        return serving

    def evict(self, name: str) -> None:
        """Forget a loaded adapter (batches that hold it keep their own reference)."""
        with self._lock:
            self._loaded.pop(name, None)

    def resolve_rows(self, names: Sequence[str | None]) -> list[ServingAdapter | None]:
        """Every row's adapter, all loaded before any is used (one bad name fails the batch).

        Rows naming none get the default adapter, when there is one.
        """
        names = [self.default if n is None else n for n in names]
        unique = {n: self.get(n) for n in dict.fromkeys(n for n in names if n is not None)}
        return [None if n is None else unique[n] for n in names]


def overlay(rows: Sequence[ServingAdapter | None]) -> dict[str, LowRankDelta]:
    """One delta per adapted projection for a batch whose row i uses `rows[i]`."""
    used = list({id(a): a for a in rows if a is not None}.values())
    if not used:
        return {}
    if len(used) == 1 and all(a is used[0] for a in rows):
        return {path: LowRankDelta(a, b) for path, (a, b) in used[0].pairs.items()}
    deltas = {}
    paths = sorted({p for adapter in used for p in adapter.pairs})
    for path in paths:
        have = [a for a in used if path in a.pairs]
        a0, b0 = have[0].pairs[path]
        rank = max(a.rank for a in have)
        a_rows = a0.new_zeros(len(rows), rank, a0.shape[1])
        b_rows = b0.new_zeros(len(rows), b0.shape[0], rank)
        for i, adapter in enumerate(rows):
            if adapter is not None and path in adapter.pairs:
                a, b = adapter.pairs[path]
                a_rows[i, : a.shape[0]] = a
                b_rows[i, :, : b.shape[1]] = b
        deltas[path] = LowRankDelta(a_rows, b_rows)
    return deltas


@contextmanager
def overlaid(models: Sequence[Transformer], deltas: dict[str, LowRankDelta]) -> Iterator[None]:
    """Attach `deltas` to the seams of each model for one batch, then restore what was there."""
    saved = [
        {name: m.delta for name, m in model.named_modules() if isinstance(m, Linear)}
        for model in models
    ]
    try:
        for model in models:
            set_deltas(model, deltas)
        yield
    finally:
        for model, before in zip(models, saved, strict=True):
            set_deltas(model, {n: d for n, d in before.items() if d is not None})
