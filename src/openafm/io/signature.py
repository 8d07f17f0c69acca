"""A model's signature: a hash of its config and weights, to bind adapters to their base."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from openafm.model import ModelConfig


def model_signature(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the config and every tensor's name, dtype, shape and bytes (sorted by name).

    The tied output head is the embedding itself (dense or compressed) and is hashed once.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(tensors):
        if name.startswith("output.") and config.tie_embeddings:
            continue
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
