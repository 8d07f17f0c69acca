"""A KV cache whose rows (slots) are filled and emptied one request at a time: continuous
batching. Rows share one write position; a row that joins is right-aligned at it, its left part
masked as padding, so the model sees an ordinary left-padded batch."""

from __future__ import annotations

import torch

from openafm.model.kv_cache import KVCache


class SlotCache:
    """`slots` rows of keys and values, stored row-major: `(slots, layers, kv_heads, max_len,
    head_dim)`, so a one-row view is contiguous (the native decode kernels take it).

    `view(n)` is a `KVCache` over the first n rows sharing this storage (the model writes
    through it); `place` copies a request's prefilled cache into a free row; `release` zeroes
    a row. The storage grows when the shared position reaches its end and is compacted when
    every row has padding to spare.
    """

    def __init__(
        self,
        n_layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        *,
        max_len: int = 256,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n_layers, self.slots, self.kv_heads, self.head_dim = (
            n_layers,
            slots,
            kv_heads,
            head_dim,
        )
        self.dtype = dtype
        self.length = 0
        self.pad = torch.zeros(slots, dtype=torch.long)
        self.used = [False] * slots
        self.max_len = 0
        self.initial_len = max_len
        self._storage: list[torch.Tensor] = []
        self._resize(max_len)

    def shrink(self) -> None:
        """With every row free, go back to the first size (memory goes back to the system)."""
        if any(self.used) or self.max_len == self.initial_len:
            return
        self.length = 0
        self.pad.zero_()
        self._storage = []
        self._resize(self.initial_len)

    def _resize(self, max_len: int) -> None:
        """Storage of `max_len` positions, keeping positions [0, length)."""
        shape = (self.slots, self.n_layers, self.kv_heads, max_len, self.head_dim)
        shapes = [shape, shape]
        if self.dtype == torch.int8:
            shapes += [(*shape[:-1], 1)] * 2
        dtypes = [self.dtype, self.dtype, torch.float16, torch.float16]
        fresh = [torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes, strict=False)]
        for new, old in zip(fresh, self._storage, strict=False):
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
        self._storage = fresh
        self.max_len = max_len

    def _shift(self, by: int) -> None:
        """Move every row's positions by `by` (right if positive), padding grows by as much."""
        length = self.length
        for t in self._storage:
            if by > 0:
                t[:, :, :, by : by + length] = t[:, :, :, :length].clone()
                t[:, :, :, :by] = 0
            else:
                t[:, :, :, : length + by] = t[:, :, :, -by:length].clone()
                t[:, :, :, length + by : length] = 0
        self.length += by
        self.pad = (self.pad + by).clamp_(min=0)

    def compact(self) -> None:
        """Drop the padding every busy row has (shift all rows left by the least of it)."""
        spare = min((int(self.pad[i]) for i in range(self.slots) if self.used[i]), default=0)
        if spare:
            self._shift(-spare)

    def reserve(self, n_new: int) -> None:
        """Room for `n_new` more positions: compact first, grow only if that is not enough."""
        if self.length + n_new <= self.max_len:
            return
        self.compact()
        if self.length + n_new > self.max_len:
            self._resize(max(self.length + n_new, self.max_len * 3 // 2))

    def free_slot(self) -> int | None:
        return next((i for i, used in enumerate(self.used) if not used), None)

    def place(self, slot: int, prompt: KVCache, n_tokens: int) -> None:
        """Copy the first `n_tokens` positions of a one-row cache into `slot`, ending at the
        shared position (shifting every row right when the prompt is longer than that)."""
        if self.used[slot]:
            raise ValueError(f"slot {slot} is in use")
        if not any(self.used):
            self.length = 0
            self.pad.zero_()
        if n_tokens > self.length:
            self.reserve(n_tokens - self.length)
            self._shift(n_tokens - self.length)
        start = self.length - n_tokens
        sources = [prompt.keys, prompt.values, prompt.key_scale, prompt.value_scale]
        for store, source in zip(self._storage, sources, strict=False):
            assert source is not None
            store[slot, :, :, :start] = 0
            store[slot, :, :, start : self.length] = source[:, 0, :, :n_tokens]
        self.pad[slot] = start
        self.used[slot] = True

    def release(self, slot: int) -> None:
        """Zero a row's keys and values and mask it entirely until it is placed again."""
        for store in self._storage:
            store[slot].zero_()
        self.pad[slot] = self.length
        self.used[slot] = False

    def view(self, n: int) -> KVCache:
        """A `KVCache` over rows [0, n), sharing this storage, at the shared position."""
        cache = KVCache(self.n_layers, n, self.max_len, dtype=self.dtype, pad=self.pad[:n])
        rows = [t[:n].transpose(0, 1) for t in self._storage]  # (layers, n, heads, len, dim)
        cache.keys, cache.values = rows[0], rows[1]
        if self.dtype == torch.int8:
            cache.key_scale, cache.value_scale = rows[2], rows[3]
        cache.length = self.length
        return cache

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._storage)
