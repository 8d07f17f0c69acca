"""The HTTP API: OpenAI's chat and completion routes, models (adapters as models), adapters
loaded and unloaded at run time, health, Prometheus metrics and the manifest."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from openafm.adapters import AdapterError
from openafm.runtime import (
    Completion,
    ContextLengthError,
    Pretrained,
    SamplingParams,
    load_pretrained,
)
from openafm.runtime.continuous import QueueFullError
from openafm.serve import protocol
from openafm.serve.config import ServeConfig
from openafm.serve.errors import (
    APIError,
    api_error_handler,
    error_body,
    http_error_handler,
    internal_error_handler,
    validation_error_handler,
)
from openafm.serve.metrics import Metrics
from openafm.serve.privacy import WriteGuard, log, log_event
from openafm.serve.worker import ModelWorker, Submission

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class Guardrails:
    """ASGI middleware: refuse bodies over the limit (413) and count requests by route
    template and status (never by the path a client sent)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            self.metrics.requests.labels("other", "413").inc()
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise APIError(413, f"the body exceeds {self.max_body_bytes} bytes")
            return message

        async def recording_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "other")
            self.metrics.requests.labels(template, str(status["code"])).inc()

    async def _too_large(self, send: Callable) -> None:
        body = json.dumps(
            error_body(413, f"the body exceeds {self.max_body_bytes} bytes", None, None)
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(
    config: ServeConfig,
    worker: ModelWorker | None = None,
    loader: Callable[[str | None], Pretrained] = load_pretrained,
) -> FastAPI:
    """The server's app; the model loads (with `loader`) in the background when it starts."""
    metrics = worker.metrics if worker is not None else Metrics()
    worker = worker or ModelWorker(config, metrics, loader)
    guard = WriteGuard.get() if config.private else None
    if guard is not None:
        guard.on_refuse = metrics.blocked_writes.inc

    def load() -> None:
        with contextlib.suppress(Exception):  # the failure is kept in worker.failed
            worker.load()
        if worker.failed:
            log.error("could not load the model: %s", worker.failed)
        if worker.ready.is_set():
            if guard is not None:
                guard.armed = True
            names = ", ".join(sorted(worker.adapters)) or "none"
            log.info(
                "serving %s (adapters: %s) at http://%s:%d",
                worker.name,
                names,
                config.host,
                config.port,
            )
            log_event(
                "ready",
                model=worker.name,
                adapters=sorted(worker.adapters),
                host=config.host,
                port=config.port,
            )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # not a daemon: the interpreter's exit waits for it, since exiting under native code
        # that is still loading the model aborts the process
        threading.Thread(target=load, name="openafm-load").start()
        yield
        if guard is not None:
            guard.armed = False
        await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="OpenAFM",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.worker = worker
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    app.add_middleware(Guardrails, max_body_bytes=config.max_body_bytes, metrics=metrics)

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise APIError(401, "missing or wrong API key", code="invalid_api_key")

    def ready() -> ModelWorker:
        if not worker.ready.is_set():
            raise APIError(503, "the model is still loading", code="loading")
        return worker

    @app.get("/health")
    async def health() -> JSONResponse:
        if worker.failed:
            return JSONResponse({"status": "failed", "error": worker.failed}, status_code=503)
        if not worker.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": worker.name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, object]:
        served = ready()
        data = [_model_card(served.name, None)]
        data += [_model_card(name, served.name) for name in served.adapters]
        return {"object": "list", "data": data}

    @app.get("/v1/manifest", dependencies=[Depends(authorized)])
    async def manifest() -> dict[str, object]:
        return ready().manifest

    @app.post("/v1/adapters", dependencies=[Depends(authorized)])
    async def load_adapter(body: protocol.AdapterLoad) -> dict[str, object]:
        served = ready()
        if body.name == served.name or body.name in served.adapters:
            raise APIError(400, "a model of that name is already served", param="name")
        try:
            served.add_adapter(body.name, Path(body.path))
        except AdapterError as error:
            raise APIError(400, str(error), param="path", code="invalid_adapter") from None
        log_event("adapter_loaded", model=served.name, adapters=body.name)
        return _model_card(body.name, served.name)

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(authorized)])
    async def unload_adapter(name: str) -> dict[str, object]:
        served = ready()
        if name not in served.adapters:
            raise APIError(404, "no adapter of that name is served", code="model_not_found")
        served.remove_adapter(name)
        log_event("adapter_unloaded", model=served.name, adapters=name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request) -> Response:
        served = ready()
        adapter = _adapter_for(served, body.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        try:
            prompt = served.engine.tokenizer.encode_chat(messages)  # type: ignore[union-attr]
        except Exception:
            raise APIError(400, "the messages do not fit the model's chat template") from None
        return await _respond(served, config, body, prompt, adapter, request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: protocol.CompletionRequest, request: Request) -> Response:
        served = ready()
        adapter = _adapter_for(served, body.model)
        prompt = served.engine.tokenizer.encode(body.text())  # type: ignore[union-attr]
        return await _respond(served, config, body, prompt, adapter, request, chat=False)

    return app


def _model_card(name: str, parent: str | None) -> dict[str, object]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "openafm",
        "root": name,
        "parent": parent,
    }


def _adapter_for(worker: ModelWorker, model: str) -> str | None:
    if model == worker.name:
        return None
    if model in worker.adapters:
        return model
    raise APIError(404, "the model does not exist", param="model", code="model_not_found")


def _sampling(
    body: protocol.ChatCompletionRequest | protocol.CompletionRequest, config: ServeConfig, i: int
) -> SamplingParams:
    seed = None if body.seed is None else body.seed + i
    return SamplingParams(
        max_tokens=body.token_limit() or config.max_tokens_default,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=seed,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
    )


def _failure(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, AdapterError):
        return APIError(
            400, "the adapter could not be used with this model", code="invalid_adapter"
        )
    return APIError(500, f"generation failed ({type(error).__name__})", code="internal_error")


async def _respond(
    worker: ModelWorker,
    config: ServeConfig,
    body: protocol.ChatCompletionRequest | protocol.CompletionRequest,
    prompt: list[int],
    adapter: str | None,
    request: Request,
    *,
    chat: bool,
) -> Response:
    """Submit the request's n choices, then answer in one body or as a stream."""
    request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    log = _RequestLog(worker, request_id, "chat" if chat else "completions", len(prompt), body)
    grammar = body.grammar()
    try:
        constraints = [
            None if grammar is None else worker.json_constraint(grammar) for _ in range(body.n)
        ]
    except ValueError:
        raise APIError(400, "the JSON schema cannot be used", param="response_format") from None
    submissions: list[Submission] = []
    try:
        for i, constraint in enumerate(constraints):
            params = _sampling(body, config, i)
            submissions.append(worker.submit(prompt, params, adapter, constraint))
    except Exception as error:
        for submission in submissions:
            submission.cancel()
        raise _refusal(error, len(prompt), chat) from None
    if body.stream:
        events = _stream_events(submissions, request_id, body, chat, log)
        return StreamingResponse(events, media_type="text/event-stream")
    collect = asyncio.ensure_future(_collect(submissions, log))
    watch = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait(
        {collect, watch}, timeout=config.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    watch.cancel()
    if collect not in done:
        collect.cancel()
        for submission in submissions:
            submission.cancel()
        if watch in done:
            log.finish(499, [])
            return Response(status_code=499)
        log.finish(408, [])
        raise APIError(408, "the request took longer than the server allows", code="timeout")
    results = collect.result()
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        log.finish(_failure(failures[0]).status, [])
        raise _failure(failures[0])
    completions = [r for r in results if isinstance(r, Completion)]
    log.finish(200, completions)
    answers = [(c.text, c.finish_reason) for c in completions]
    tokens = sum(c.completion_tokens for c in completions)
    usage = protocol.usage(len(prompt), tokens)
    return JSONResponse(protocol.completion(request_id, body.model, answers, usage, chat=chat))


def _refusal(error: Exception, prompt_tokens: int, chat: bool) -> APIError:
    """The error for a request the batcher would not take."""
    if isinstance(error, ContextLengthError):
        return APIError(
            400,
            f"the prompt ({prompt_tokens} tokens) does not fit the context window",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    if isinstance(error, QueueFullError):
        return APIError(429, "the server is busy: too many requests wait", code="queue_full")
    if isinstance(error, ValueError):
        return APIError(400, "the prompt cannot be generated from", code="invalid_prompt")
    return _failure(error)


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


class _RequestLog:
    """Timings and token counts of one request, for metrics and one allow-listed log line."""

    def __init__(
        self, worker: ModelWorker, request_id: str, route: str, prompt_tokens: int, body: Any
    ) -> None:
        self.worker, self.request_id, self.route = worker, request_id, route
        self.prompt_tokens, self.body = prompt_tokens, body
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None

    def piece(self) -> None:
        now = time.perf_counter()
        model = self.worker.name
        if self.first is None:
            self.first = now
            self.worker.metrics.ttft.labels(model).observe(now - self.started)
        elif self.last is not None:
            self.worker.metrics.itl.labels(model).observe(now - self.last)
        self.last = now

    def finish(self, status: int, completions: list[Completion]) -> None:
        model = self.worker.name
        generated = sum(c.completion_tokens for c in completions)
        self.worker.metrics.prompt_tokens.labels(model).inc(self.prompt_tokens)
        self.worker.metrics.generation_tokens.labels(model).inc(generated)
        log_event(
            "request",
            request_id=self.request_id,
            route=self.route,
            model=model,
            status=status,
            n=self.body.n,
            stream=self.body.stream,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=generated,
            ttft_ms=None if self.first is None else round((self.first - self.started) * 1e3, 1),
            duration_ms=round((time.perf_counter() - self.started) * 1e3, 1),
            finish_reason=",".join(c.finish_reason for c in completions) or None,
        )


async def _collect(
    submissions: list[Submission], log: _RequestLog
) -> list[Completion | BaseException]:
    """Every choice's final event (its Completion or error)."""

    async def last_event(submission: Submission) -> Completion | BaseException:
        async for event in submission.events():
            if isinstance(event, str):
                log.piece()
            else:
                return event
        raise RuntimeError("the request ended without a result")

    return list(await asyncio.gather(*(last_event(s) for s in submissions)))


async def _stream_events(
    submissions: list[Submission], request_id: str, body: Any, chat: bool, log: _RequestLog
) -> AsyncIterator[str]:
    """Server-sent events: pieces of every choice as they come, each choice's end, the usage
    when asked, then [DONE]. A client that goes away cancels every choice."""
    model = body.model
    merged: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, submission: Submission) -> None:
        async for event in submission.events():
            await merged.put((index, event))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(submissions)]
    completions: list[Completion] = []
    status = 200
    try:
        if chat:
            for i in range(len(submissions)):
                yield _sse(
                    protocol.chunk(request_id, model, chat=True, index=i, text="", role=True)
                )
        open_choices = len(submissions)
        while open_choices:
            index, event = await merged.get()
            if isinstance(event, str):
                log.piece()
                yield _sse(protocol.chunk(request_id, model, chat=chat, index=index, text=event))
                continue
            open_choices -= 1
            if isinstance(event, Completion):
                completions.append(event)
                reason = event.finish_reason
                yield _sse(
                    protocol.chunk(request_id, model, chat=chat, index=index, finish_reason=reason)
                )
            else:
                failure = _failure(event)  # type: ignore[arg-type]
                status = failure.status
                yield _sse(error_body(failure.status, failure.message, failure.param, failure.code))
        if body.include_usage:
            tokens = sum(c.completion_tokens for c in completions)
            usage = protocol.usage(log.prompt_tokens, tokens)
            yield _sse(protocol.chunk(request_id, model, chat=chat, usage_=usage))
        yield "data: [DONE]\n\n"
    except BaseException:
        status = 499
        raise
    finally:
        for task in tasks:
            task.cancel()
        for submission in submissions:
            submission.cancel()
        log.finish(status, completions)


def _sse(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
