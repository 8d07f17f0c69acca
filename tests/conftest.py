"""Shared fixtures: a tiny random model (fast tests) and the real default model (slow tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openafm.compress.pipeline import CompressConfig
from openafm.model import Transformer, get_preset
from openafm.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((FIXTURES / "smollm2_reference.json").read_text())


TINY_COMPRESS = CompressConfig(
    target_bpw=3.5, bit_widths=(2, 4), calibration_tokens=1024, window=128, sensitivity_tokens=64
)
"""Palettization settings small enough for the tiny model (a few seconds)."""


def make_tiny(seed: int = 0) -> Transformer:
    model = Transformer(get_preset("tiny"))
    model.init_weights(seed=seed)
    # Non-trivial norm weights, so a mix-up of norms cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.fixture
def tiny() -> Transformer:
    return make_tiny()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model and the byte tokenizer as a Hugging Face directory (for the CLI)."""
    from openafm.io import write_hf

    path = tmp_path_factory.mktemp("tiny-model")
    model = make_tiny()
    write_hf(path, model.config, model.state_dict())
    byte_tokenizer().save(path)
    return path


@pytest.fixture(scope="session")
def tiny_long_dir(tmp_path_factory) -> Path:
    """The tiny model with room for a whole e-mail in bytes (its preset holds 256 tokens)."""
    from dataclasses import replace

    from openafm.io import write_hf

    path = tmp_path_factory.mktemp("tiny-long")
    model = make_tiny()
    write_hf(path, replace(model.config, max_seq_len=2048), model.state_dict())
    byte_tokenizer().save(path)
    return path


def byte_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token (ids 0..255),
    then special tokens; padded to `vocab_size` with unused tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: bytes_of(c))
    tokens = [*alphabet, "<|im_start|>", "<|im_end|>"]
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    types = [1] * 256 + [3, 3] + [4] * (vocab_size - 258)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return Tokenizer.from_vocab(
        tokens, [], types, pre="gpt2", bos_id=256, eos_id=257, chat_template=template
    )


def bytes_of(char: str) -> int:
    """The byte a GPT-2 byte-level character stands for."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + n)] = b
            n += 1
    return mapping[char]


@pytest.fixture(scope="session")
def smollm2():
    """The real default base (fetched into the model cache on first use)."""
    from openafm.runtime import load_pretrained

    return load_pretrained()
