"""`ModelConfig`: the architecture of a decoder, and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """A llama-family decoder: GQA, RoPE, RMSNorm, SwiGLU, optional QK-norm and tied embeddings."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count (the tied embedding counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        norms = 2 * self.dim + (2 * self.head_dim if self.qk_norm else 0)
        body = self.n_layers * (attn + mlp + norms) + self.dim
        if not embeddings:
            return body
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return body + self.vocab_size * self.dim + head


PRESETS: dict[str, ModelConfig] = {
    # SmolLM2-135M(-Instruct): the default on-device base at small scale.
    "smollm2-135m": ModelConfig(
        vocab_size=49_152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        norm_eps=1e-5,
        rope_theta=100_000.0,
        max_seq_len=8192,
    ),
    # Apple's published on-device AFM (June 2024). The FFN width is not published;
    # 8192 (8/3 of the width) gives 2.62B non-embedding parameters, close to the paper's 2.58B.
    "afm-on-device-3b": ModelConfig(
        vocab_size=49_152,
        dim=3072,
        n_layers=26,
        n_heads=24,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=8192,
        norm_eps=1e-5,
        rope_theta=500_000.0,
        max_seq_len=8192,
        qk_norm=True,
    ),
    # The seed's architecture at pre-training-on-a-CPU scale: 18.9M parameters, 12.6M of them
    # the (tied) embedding of SmolLM2's 49,152-token vocabulary.
    "afm-tiny": ModelConfig(
        vocab_size=49_152,
        dim=256,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=768,
        rope_theta=500_000.0,
        max_seq_len=2048,
        qk_norm=True,
    ),
    # About 1B parameters (0.95B; 0.85B without the embedding), for one-GPU training benchmarks.
    "afm-1b": ModelConfig(
        vocab_size=49_152,
        dim=2048,
        n_layers=18,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=5632,
        rope_theta=500_000.0,
        max_seq_len=4096,
        qk_norm=True,
    ),
    # Small enough for unit tests; shapes divide evenly for 2-way tensor parallelism.
    "tiny": ModelConfig(
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        rope_theta=10_000.0,
        max_seq_len=256,
        qk_norm=True,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
