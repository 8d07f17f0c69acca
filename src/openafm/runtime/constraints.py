"""Constrained sampling: tokens that would break a grammar are masked before each choice
(llguidance computes the mask; about 0.4 ms a token for this vocabulary)."""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from openafm.tokenizer import Tokenizer

ANY_JSON_OBJECT = '{"type": "object"}'


class TokenConstraint:
    """One answer's grammar state: `restrict` masks a row of logits, `accept` advances."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.torch

        self._torch = llguidance.torch
        self.matcher = matcher
        self.mask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def restrict(self, logits: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place (`logits` is `(1, vocab)`)."""
        self._torch.fill_next_token_bitmask(self.matcher, self.mask, 0)
        self._torch.apply_token_bitmask_inplace(logits, self.mask)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} breaks the grammar: {self.matcher.get_error()}")


class Constraints:
    """Makes constraints for one tokenizer (its llguidance twin is built once, on first use)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        import llguidance

        with self._lock:
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=self.tokenizer.eos_id,
                )
        return self._ll

    def json_schema(self, schema: str = ANY_JSON_OBJECT) -> TokenConstraint:
        """Answers that are one JSON value of `schema` (default: any object), then the end.
        Whitespace between tokens is fixed (", " and ": "): free whitespace lets a small
        model pad forever."""
        import llguidance

        try:
            spec = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"the schema is not JSON: {error}") from None
        if not isinstance(spec, dict):
            raise ValueError("the schema must be a JSON object")
        spec.setdefault("x-guidance", {"whitespace_flexible": False})
        grammar = llguidance.grammar_from("json_schema", json.dumps(spec))
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar)
        if matcher.is_error():
            raise ValueError(f"invalid JSON schema: {matcher.get_error()}")
        return TokenConstraint(matcher, self.vocab_size)
