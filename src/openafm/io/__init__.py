"""Checkpoints in and out: GGUF, Hugging Face safetensors, the model cache, model signatures."""

from openafm.io.errors import CheckpointError, FetchError
from openafm.io.fetch import DEFAULT_MODEL, KNOWN_MODELS, fetch_model, openafm_home
from openafm.io.gguf_file import Checkpoint, read_gguf, write_gguf
from openafm.io.hf_checkpoint import read_hf, write_hf
from openafm.io.load import build_model, load_model, read_checkpoint, resolve_model
from openafm.io.signature import model_signature

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "Checkpoint",
    "CheckpointError",
    "FetchError",
    "build_model",
    "fetch_model",
    "load_model",
    "model_signature",
    "openafm_home",
    "read_checkpoint",
    "read_gguf",
    "read_hf",
    "resolve_model",
    "write_gguf",
    "write_hf",
]
