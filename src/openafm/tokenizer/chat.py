"""Chat prompts rendered from the model's own Jinja template, as Hugging Face renders them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, str]


class ChatTemplateError(ValueError):
    """The template is invalid, or rejected the messages."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


class ChatTemplate:
    """A model's `chat_template`, rendered in a sandbox with `trim_blocks`/`lstrip_blocks` like HF."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except (TemplateError, TypeError, ValueError) as exc:
            raise ChatTemplateError(f"invalid chat template: {exc}") from None
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ChatTemplateError(f"a message needs string 'role' and 'content': {dict(m)!r}")
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # the template is code from a file: TypeError, 1/0, ... too
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, with an optional system prompt (else the template's default applies)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": prompt}]
