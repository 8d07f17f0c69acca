"""Inference: load a model, prefill and decode with a KV cache, sample, stop, stream."""

from openafm.runtime.engine import Completion, ContextLengthError, Engine
from openafm.runtime.loader import Pretrained, load_pretrained, load_tokenizer_for
from openafm.runtime.sampling import SamplingParams, sample_next

__all__ = [
    "Completion",
    "ContextLengthError",
    "Engine",
    "Pretrained",
    "SamplingParams",
    "load_pretrained",
    "load_tokenizer_for",
    "sample_next",
]
