"""A preallocated key/value cache, updated in place, for batched left-padded decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, `(layers, batch, kv_heads, max_len, head_dim)`.

    Prompts of different lengths are left-padded so every row writes at the same position;
    `pad` holds each row's padding length so padded keys are masked and positions start at 0.
    Buffers are allocated on the first write, with the head count the layer actually has
    (under tensor parallelism that is the local share). With `dtype=torch.int8` every key and
    value vector is stored as int8 with its own float16 scale (symmetric, per token and head)
    and read back in float32: a quarter of the float32 cache's memory.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | None = None,
    ) -> None:
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.key_scale: torch.Tensor | None = None
        self.value_scale: torch.Tensor | None = None
        self.pad = None if pad is None or not bool(pad.any()) else pad.to(self.device)

    def _allocate(self, kv_heads: int, head_dim: int) -> None:
        shape = (self.n_layers, self.batch_size, kv_heads, self.max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.dtype == torch.int8:
            scale_shape = (*shape[:-1], 1)
            self.key_scale = torch.zeros(scale_shape, dtype=torch.float16, device=self.device)
            self.value_scale = torch.zeros(scale_shape, dtype=torch.float16, device=self.device)

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (batch, kv_heads, T, head_dim) at the current position; return all keys so far."""
        if self.keys is None:
            self._allocate(k.shape[1], k.shape[3])
        assert self.keys is not None and self.values is not None
        end = self.length + k.shape[2]
        if self.key_scale is None or self.value_scale is None:
            self.keys[layer, :, :, self.length : end] = k
            self.values[layer, :, :, self.length : end] = v
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        for store, scales, x in (
            (self.keys, self.key_scale, k),
            (self.values, self.value_scale, v),
        ):
            scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8).to(torch.float16)
            store[layer, :, :, self.length : end] = torch.round(x / scale.float()).to(torch.int8)
            scales[layer, :, :, self.length : end] = scale
        return (
            self.keys[layer, :, :, :end].float() * self.key_scale[layer, :, :, :end].float(),
            self.values[layer, :, :, :end].float() * self.value_scale[layer, :, :, :end].float(),
        )

    def buffers(self, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole float key and value buffers, allocated on first use (for writers that
        index them themselves: the native decoder stack)."""
        if self.keys is None:
            self._allocate(kv_heads, head_dim)
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(
                f"KV cache full: {self.length} + {n_new} tokens exceed its {self.max_len} slots"
            )

    def positions(self, n_new: int) -> torch.Tensor:
        """RoPE positions of the next `n_new` tokens: shared `(T,)` or per row `(B, T)`."""
        pos = torch.arange(self.length, self.length + n_new, device=self.device)
        if self.pad is None:
            return pos
        return (pos.unsqueeze(0) - self.pad.unsqueeze(1)).clamp_(min=0)

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        """Boolean mask `(B, 1, T, S)` (True = attend), or None when plain causal attention is exact.

        None means: no padding, and either one new token (it sees every cached key) or an empty
        cache (top-left causal alignment is then correct).
        """
        if self.pad is None and (n_new == 1 or self.length == 0):
            return None
        end = self.length + n_new
        q_idx = torch.arange(self.length, end, device=self.device).view(1, 1, -1, 1)
        k_idx = torch.arange(end, device=self.device).view(1, 1, 1, -1)
        mask = k_idx <= q_idx
        if self.pad is not None:
            real_key = k_idx >= self.pad.view(-1, 1, 1, 1)
            # A padded query attends to itself so its softmax row is not empty.
            mask = mask & (real_key | (k_idx == q_idx))
        return mask

    def advance(self, n_new: int) -> None:
        self.length += n_new

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rejected speculative tokens); they are
        overwritten by the next write."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        scales = 0 if self.key_scale is None else 2 * self.key_scale.nbytes
        return self.keys.nbytes + self.values.nbytes + scales
