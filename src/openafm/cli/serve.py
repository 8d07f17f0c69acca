"""`afm serve`: the OpenAI-compatible HTTP server (thin: options → ServeConfig → uvicorn)."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer


def serve(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model to serve: a known name, GGUF file or directory (default: the on-device base)."
        ),
    ] = None,
    adapters: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder of adapters to serve as models (repeatable) (default: the shipped and"
            " your installed adapters that were trained on the served model)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="OPENAFM_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests decoded together.")] = 8,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait for a row; more get 429.")
    ] = 64,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest request body; larger gets 413.")
    ] = 1 << 20,
    request_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a non-streamed request may take; then 408.")
    ] = 600.0,
    private: Annotated[
        bool,
        typer.Option(
            help="Private mode: no request content in logs, metrics or errors; no file written"
            " while serving; per-request state zeroed."
        ),
    ] = True,
) -> None:
    """Serve the model and its feature adapters over OpenAI's HTTP API (chat and completions,
    streaming, adapters as models), batching concurrent requests continuously."""
    import uvicorn

    from openafm.cli.common import load_named, user_errors
    from openafm.serve import ServeConfig, create_app
    from openafm.serve.privacy import ExceptionTypeOnly

    with user_errors():  # bound here, so that --port 0 reports the port it got
        listener = socket.create_server((host, port), family=_family(host))
    config = ServeConfig(
        model=model,
        adapters=tuple(adapters) if adapters else None,
        host=host,
        port=listener.getsockname()[1],
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        request_timeout_s=request_timeout,
        private=private,
    )
    from openafm.compress.default_model import recipe_names
    from openafm.io import resolve_model

    with user_errors():  # a wrong name or path fails here, not minutes later on /health
        if model not in recipe_names():
            resolve_model(model)
        for folder in adapters or []:
            if not folder.is_dir():
                raise FileNotFoundError(f"adapters folder {folder} does not exist")
    if private:
        logging.getLogger("uvicorn.error").addFilter(ExceptionTypeOnly())
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: let that end with status 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, loader=load_named),
            host=host,
            port=config.port,
            access_log=not private,
            log_level="info",
            timeout_graceful_shutdown=10,
        )
    )
    server.run(sockets=[listener])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
