"""OpenAI's request bodies (validated) and response objects, for chat and plain completions."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, …)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchema(_Body):
    name: str = "answer"
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = Field(default_factory=dict)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None

    def grammar(self) -> str | None:
        """The JSON schema answers must follow (any object for json_object), or None."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema":
            schema = self.json_schema.schema_ if self.json_schema else {}
            return json.dumps(schema or {"type": "object"})
        return None


class _Sampling(_Body):
    model: str
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1, le=8)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-turn

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def grammar(self) -> str | None:
        return None if self.response_format is None else self.response_format.grammar()


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class AdapterLoad(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    path: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str,
    model: str,
    answers: list[tuple[str, str]],
    usage_: dict[str, int],
    *,
    chat: bool,
) -> dict[str, object]:
    """A `chat.completion` or `text_completion` with one choice per (text, finish_reason)."""
    choices: list[dict[str, object]] = []
    for i, (text, reason) in enumerate(answers):
        content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choices.append({"index": i, **content, "finish_reason": reason, "logprobs": None})
    return {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chunk(
    request_id: str,
    model: str,
    *,
    chat: bool,
    index: int = 0,
    text: str | None = None,
    finish_reason: str | None = None,
    role: bool = False,
    usage_: dict[str, int] | None = None,
) -> dict[str, object]:
    """One streamed chunk: a piece of one choice, its end, or (choices empty) the usage."""
    choices: list[dict[str, object]] = []
    if usage_ is None:
        if chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choices.append({"index": index, "delta": delta, "finish_reason": finish_reason})
        else:
            choices.append({"index": index, "text": text or "", "finish_reason": finish_reason})
    out: dict[str, object] = {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        out["usage"] = usage_
    return out
