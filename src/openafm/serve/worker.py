"""The served model: loaded in the background, its adapters found and registered, one thread
running the continuous batcher, and an async `generate` for the routes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from openafm import __version__
from openafm.adapters import AdapterError, check_adapter_name
from openafm.adapters.adapter_file import read_adapter_meta
from openafm.adapters.registry import SHIPPED_DIR, user_adapters_dir
from openafm.io.fetch import DEFAULT_MODEL
from openafm.runtime import Engine, Pretrained, SamplingParams, engine_for, load_pretrained
from openafm.runtime.constraints import Constraints, TokenConstraint
from openafm.runtime.continuous import ContinuousBatcher, Event, Request
from openafm.serve.config import ServeConfig
from openafm.serve.metrics import Metrics
from openafm.serve.privacy import code_sha256, files_sha256, log_event

PALETTIZED_ADAPTERS = SHIPPED_DIR.parent / "adapters-palettized"


def served_name(model: str | None) -> str:
    """The id clients name the base by: a known name as is, a path by its last part."""
    text = model or DEFAULT_MODEL
    return Path(text).name if "/" in text else text


class ModelWorker:
    """One base model and its adapters, served by a continuous batcher on its own thread."""

    def __init__(
        self,
        config: ServeConfig,
        metrics: Metrics,
        loader: Callable[[str | None], Pretrained] = load_pretrained,
    ) -> None:
        self.config = config
        self.loader = loader
        self.metrics = metrics
        self.name = served_name(config.model)
        self.ready = threading.Event()
        self.failed: str | None = None
        self.adapters: dict[str, Path] = {}
        self.manifest: dict[str, object] = {}
        self.engine: Engine | None = None
        self.batcher: ContinuousBatcher | None = None
        self.constraints: Constraints | None = None
        self.signature = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- start and stop -------------------------------------------------------------------

    def load(self) -> None:
        """Load the model, find its adapters, warm up, start the batcher (on any thread); stopped
        while loading, it ends before the warm-up."""
        try:
            pretrained = self.loader(self.config.model)
            engine = engine_for(
                pretrained,
                prefill_dtype=torch.bfloat16,
                adapter_budget_bytes=self.config.adapter_budget_bytes,
            )
            self.signature = pretrained.signature()
            assert engine.adapters is not None
            engine.adapters.resolve = self._adapter_path
            self._discover(self.config.adapters)
            self.engine = engine
            self.constraints = Constraints(engine.tokenizer, engine.model.config.vocab_size)
            self.batcher = ContinuousBatcher(
                engine, max_batch=self.config.max_batch, max_queue=self.config.max_queue
            )
            if self._stop.is_set():  # stopped while loading: serve nothing
                return
            self._warm_up()
            self.constraints.json_schema()  # builds the grammar's tokenizer before serving
            self.manifest = {
                "openafm_version": __version__,
                "code_sha256": code_sha256(),
                "model": {
                    "id": self.name,
                    "signature": self.signature,
                    "files_sha256": files_sha256(pretrained.path),
                },
                "adapters": {},
            }
            for name, path in self.adapters.items():
                self.manifest["adapters"][name] = files_sha256(path)  # type: ignore[index]
            self._thread = threading.Thread(target=self._run, name="openafm-batcher", daemon=True)
            self._thread.start()
            self.ready.set()
        except Exception as error:
            self.failed = f"{type(error).__name__}: {error}"
            raise

    def _warm_up(self) -> None:
        """One short generation, so kernels are compiled and buffers allocated before serving
        (private mode refuses file writes once it serves)."""
        assert self.batcher is not None and self.engine is not None
        done = threading.Event()
        ids = self.engine.tokenizer.encode("Hello")
        self.batcher.submit(ids, SamplingParams(max_tokens=2), lambda e: done.set())
        while not done.is_set():
            self.batcher.step()

    def _run(self) -> None:
        assert self.batcher is not None
        batcher = self.batcher

        def measure(stepped: bool) -> None:
            if stepped:
                self.metrics.batch_rows.observe(batcher.active)
            self.metrics.queue_depth.set(batcher.waiting)
            self.metrics.batch_size.set(batcher.active)

        batcher.run(self._stop, measure, idle_s=0.05)

    def stop(self) -> None:
        """Cancel what runs and waits, then stop the batcher's thread."""
        if self.batcher is not None:
            self.batcher.cancel_all()
            deadline = time.monotonic() + 5
            while self.batcher.active and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- adapters -------------------------------------------------------------------------

    def _adapter_path(self, name: str) -> Path:
        if name in self.adapters:
            return self.adapters[name]
        if Path(name).is_dir():  # the recovery adapter of a compressed model
            return Path(name)
        raise AdapterError(f"unknown adapter {name!r}")

    def _discover(self, folders: Sequence[Path] | None) -> None:
        """Adapters trained on this base, from the given folders or the shipped and user ones
        (the first of a name wins; others are skipped, with a log line)."""
        search = (
            list(folders) if folders else [user_adapters_dir(), SHIPPED_DIR, PALETTIZED_ADAPTERS]
        )
        for folder in search:
            if not folder.is_dir():
                if folders:
                    raise FileNotFoundError(f"adapters folder {folder} does not exist")
                continue
            for path in sorted(folder.iterdir()):
                if path.name in self.adapters or not (path / "adapter.json").is_file():
                    continue
                try:
                    self.add_adapter(path.name, path)
                except AdapterError:
                    log_event("adapter_skipped", model=self.name, adapters=path.name)

    def add_adapter(self, name: str, path: Path) -> None:
        """Register an adapter by name, refusing one trained on another base."""
        check_adapter_name(name)
        try:
            meta = read_adapter_meta(path)
        except AdapterError:
            raise AdapterError("not an adapter folder (adapter.json missing or invalid)") from None
        if meta.get("base_signature") != self.signature:
            raise AdapterError(
                f"the adapter was trained on base {str(meta.get('base_signature'))[:12]}…, not on"
                f" the served model's ({self.signature[:12]}…)"
            )
        self.adapters[name] = path
        if self.manifest:
            self.manifest["adapters"][name] = files_sha256(path)  # type: ignore[index]

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter; requests already running with it finish with it."""
        if name not in self.adapters:
            raise AdapterError(f"unknown adapter {name!r}")
        del self.adapters[name]
        self.manifest["adapters"].pop(name, None)  # type: ignore[union-attr]
        if self.engine is not None and self.engine.adapters is not None:
            self.engine.adapters.evict(name)

    # --- generation -----------------------------------------------------------------------

    def json_constraint(self, schema: str) -> TokenConstraint:
        """A fresh grammar state for one answer that must be JSON following `schema`."""
        assert self.constraints is not None
        return self.constraints.json_schema(schema)

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        adapter: str | None,
        constraint: TokenConstraint | None = None,
    ) -> Submission:
        """Queue a request from the event loop's thread; its events arrive on that loop.
        Raises ContextLengthError, QueueFullError or ValueError at once."""
        assert self.batcher is not None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = self.batcher.submit(prompt, params, sink, adapter, constraint)
        self.metrics.queue_depth.set(self.batcher.waiting)
        return Submission(request, events)


@dataclass
class Submission:
    """A submitted request: its events (text pieces, then a Completion or an error)."""

    request: Request
    queue: asyncio.Queue[Event]

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            yield event
            if not isinstance(event, str):
                return

    def cancel(self) -> None:
        """Free the request's row (nothing happens if it has finished)."""
        self.request.cancel()
