"""The decoder architecture: config and presets, transformer, the one linear seam, KV cache."""

from openafm.model.config import PRESETS, ModelConfig, get_preset
from openafm.model.kv_cache import KVCache
from openafm.model.linear import Linear, LowRankDelta
from openafm.model.transformer import MLP, Attention, Block, Transformer

__all__ = [
    "MLP",
    "PRESETS",
    "Attention",
    "Block",
    "KVCache",
    "Linear",
    "LowRankDelta",
    "ModelConfig",
    "Transformer",
    "get_preset",
]
