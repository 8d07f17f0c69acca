"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), built from a GGUF file or a HF directory."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from openafm.tokenizer.chat import ChatTemplate, Message

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Names the stop tokens chat models end a turn with, beyond the declared EOS.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer named by GGUF's `tokenizer.ggml.pre` (SmolLM2's: digits split one by one)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "gpt-2", "default"):
        return byte_level
    if pre in ("llama-bpe", "llama3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex])
    raise ValueError(f"unsupported pre-tokenizer {pre!r} (supported: smollm, gpt2, llama-bpe)")


class Tokenizer:
    """Text ↔ token ids, special tokens, and the model's chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        bos = backend.id_to_token(bos_id) if bos_id is not None else ""
        eos = backend.id_to_token(eos_id) if eos_id is not None else ""
        self.chat_template = (
            ChatTemplate(chat_template, bos_token=bos or "", eos_token=eos or "")
            if chat_template
            else None
        )
        stops = {eos_id} if eos_id is not None else set()
        stops |= {i for t in _END_OF_TURN if (i := backend.token_to_id(t)) is not None}
        self.stop_ids: frozenset[int] = frozenset(stops)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """sha256 of the vocabulary, merges and special tokens: equal means same ids."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are parsed."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text is not valid UTF-8") from None
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of raw documents (e.g. web text for pre-training), in parallel.

        Unlike `encode`, special-token strings written in the text (`<|im_start|>`) stay plain
        text, so a page cannot inject control tokens into training data.
        """
        self.backend.encode_special_tokens = True
        try:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        finally:
            self.backend.encode_special_tokens = False

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use plain completion (--no-chat)")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the rendered chat prompt (the template writes any BOS itself)."""
        return self.encode(self.render_chat(messages), add_bos=False)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int],
        *,
        pre: str = "gpt2",
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Build from a GGUF-style vocabulary: byte-level tokens, "a b" merges, token types."""
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        backend.pre_tokenizer = _pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(tokens[i], special=t == TOKEN_CONTROL, normalized=False)
            for i, t in enumerate(token_types)
            if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
        ]
        backend.add_tokens(specials)
        return cls(
            backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=chat_template
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as exc:  # the gguf package raises many kinds on bad files
            raise ValueError(f"{path} is not a readable GGUF file ({exc})") from None

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{path}: tokenizer model {model!r} is not supported (supported: gpt2 BPE)"
            )
        tokens = field("tokenizer.ggml.tokens")
        return cls.from_vocab(
            tokens,
            field("tokenizer.ggml.merges", []),
            field("tokenizer.ggml.token_type", [1] * len(tokens)),
            pre=field("tokenizer.ggml.pre", "gpt2"),
            bos_id=field("tokenizer.ggml.bos_token_id"),
            eos_id=field("tokenizer.ggml.eos_token_id"),
            add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
            chat_template=field("tokenizer.chat_template"),
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Read `tokenizer.json` and `tokenizer_config.json` of a Hugging Face model directory."""
        directory = Path(directory)
        backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

        def token_id(key: str) -> int | None:
            tok = cfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return backend.token_to_id(tok) if tok else None

        return cls(
            backend,
            bos_id=token_id("bos_token"),
            eos_id=token_id("eos_token"),
            add_bos=bool(cfg.get("add_bos_token", False)),
            chat_template=cfg.get("chat_template"),
        )

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` so HF tools read the same tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "tokenizer.json.partial"
        self.backend.save(str(tmp))
        os.replace(tmp, directory / "tokenizer.json")
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "bos_token": self.backend.id_to_token(self.bos_id) if self.bos_id is not None else None,
            "eos_token": self.backend.id_to_token(self.eos_id) if self.eos_id is not None else None,
        }
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template.source
        tmp = directory / "tokenizer_config.json.partial"
        tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, directory / "tokenizer_config.json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a GGUF file, or of a model directory (`tokenizer.json`, or its one GGUF)."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return Tokenizer.from_dir(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Tokenizer.from_gguf(ggufs[0])
        raise ValueError(f"{path}: no tokenizer.json or GGUF file to read a tokenizer from")
    return Tokenizer.from_gguf(path)
