"""The decoder, on one screen: `Attention`, `MLP`, `Block`, `Transformer`.

One forward serves training (no cache: causal attention over the whole sequence) and inference
(a `KVCache` written in place). Head counts are read from tensor shapes (`view(..., -1, hd)`),
so a tensor-parallel plan that shards heads across ranks applies without code changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from openafm.model.config import ModelConfig
from openafm.model.kv_cache import KVCache
from openafm.model.linear import Linear, project
from openafm.model.native_decode import stack_for
from openafm.model.norm import RMSNorm
from openafm.model.rope import RotaryEmbedding, apply_rope


def segment_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row RoPE positions `(B, T)` restarting at each segment, and the causal mask
    `(B, 1, T, T)` (True = attend) that keeps each segment to itself."""
    t = segments.shape[1]
    index = torch.arange(t, device=segments.device)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = torch.where(new, index, 0).cummax(dim=1).values
    same = segments.unsqueeze(2) == segments.unsqueeze(1)
    causal = index.unsqueeze(1) >= index.unsqueeze(0)
    return index - starts, (same & causal).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hd = config.head_dim
        self.head_dim = hd
        self.q = Linear(config.dim, config.n_heads * hd)
        self.k = Linear(config.dim, config.n_kv_heads * hd)
        self.v = Linear(config.dim, config.n_kv_heads * hd)
        self.o = Linear(config.n_heads * hd, config.dim)
        self.q_norm = RMSNorm(hd, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            y.view(b, t, -1, self.head_dim).transpose(1, 2)
            for y in project(x, self.q, self.k, self.v)
        )
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=True
        )
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Linear(config.dim, config.ffn_dim)
        self.up = Linear(config.dim, config.ffn_dim)
        self.down = Linear(config.ffn_dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate, self.up)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token ids `(batch, seq)` → logits `(batch, seq, vocab)`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed: nn.Module = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_seq_len)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tied embeddings the output head uses the embedding tensor itself (one tensor).

        A compressed embedding is tied by compressing the head with the same table.
        """
        if self.config.tie_embeddings and isinstance(self.embed, nn.Embedding):
            self.output.weight = self.embed.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations run in (that of the norms; weights may be compressed)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the model computes (that of the norms; a batch goes there)."""
        return self.norm.weight.device

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for every position, or only the last one (`last_only`, for generation)."""
        h = self.hidden_states(tokens, cache)
        if last_only:
            h = h[:, -1:]
        return self.output(h).float()

    def hidden_states(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        *,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states `(batch, seq, dim)`, before the output head.

        Training on a few positions (e.g. answer tokens) applies `output` to just those.
        `segments` `(batch, seq)` numbers the documents packed into each row (no cache): each
        attends only within itself, and its positions start at 0.
        """
        t = tokens.shape[1]
        if cache is None:
            if t > self.config.max_seq_len:
                raise ValueError(
                    f"sequence of {t} tokens exceeds max_seq_len {self.config.max_seq_len}"
                )
            if segments is None:
                positions, mask = torch.arange(t, device=tokens.device), None
            else:
                positions, mask = segment_layout(segments)
        else:
            if segments is not None:
                raise ValueError("packed segments are for training, not for a KV cache")
            cache.check_room(t)
            positions = cache.positions(t)
            mask = cache.attention_mask(t)
        cos, sin = self.rope(positions)
        h = self.embed(tokens)
        stack = stack_for(self, h, cache)
        if stack is not None and cache is not None:
            keys, values = cache.buffers(self.config.n_kv_heads, self.config.head_dim)
            h = stack(h[0], keys, values, cache.length, cos, sin).unsqueeze(0)
        else:
            for i, layer in enumerate(self.layers):
                h = layer(h, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance(t)
        return self.norm(h)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load our-named tensors by assignment (the model may live on the meta device)."""
        tensors = dict(state_dict)
        if self.config.tie_embeddings:
            if "output.weight" in tensors and not torch.equal(
                tensors["output.weight"], tensors["embed.weight"]
            ):
                raise ValueError(
                    "config says tied embeddings but output.weight differs from embed.weight"
                )
            tensors["output.weight"] = tensors["embed.weight"]
        self.load_state_dict(tensors, strict=True, assign=True)
        self.tie_weights()
        self.rope.reset(self.norm.weight.device)

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Fresh weights for training from scratch (output projections scaled by depth)."""
        gen = torch.Generator().manual_seed(seed)
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = out_std if name.endswith(("o.weight", "down.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
