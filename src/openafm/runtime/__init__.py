"""Inference: load a model, prefill and decode with a KV cache, sample, stop, stream, speculate."""

from openafm.runtime.adapter_cache import AdapterCache
from openafm.runtime.engine import Completion, ContextLengthError, Engine
from openafm.runtime.loader import Pretrained, engine_for, load_pretrained, load_tokenizer_for
from openafm.runtime.sampling import SamplingParams, sample_next
from openafm.runtime.speculative import DraftModel, PromptLookup

__all__ = [
    "AdapterCache",
    "Completion",
    "ContextLengthError",
    "DraftModel",
    "Engine",
    "Pretrained",
    "PromptLookup",
    "SamplingParams",
    "engine_for",
    "load_pretrained",
    "load_tokenizer_for",
    "sample_next",
]
