"""Continuous batching: requests join the running decode batch between steps and leave when
done, each with its own sampling settings, stop strings and adapter. One thread owns the model
(`ContinuousBatcher.run`); any thread may `submit` and `cancel`."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from openafm.model import KVCache, LowRankDelta, Transformer
from openafm.model.slot_cache import SlotCache
from openafm.runtime.adapter_cache import ServingAdapter, overlaid, overlay
from openafm.runtime.constraints import TokenConstraint
from openafm.runtime.detokenize import IncrementalDetokenizer, RowText, StopMatcher
from openafm.runtime.engine import Completion, Engine
from openafm.runtime.sampling import SamplingParams, sample_next, seeded_generator

Event = str | Completion | BaseException
"""What a request's sink receives: text pieces, then its `Completion` (or the error)."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the batcher accepts."""


@dataclass(eq=False)
class Request:
    """A submitted prompt; `sink` gets its events on the batcher's thread (keep it quick)."""

    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    sink: Callable[[Event], None]
    constraint: TokenConstraint | None = None
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the row is freed at the next step); the sink gets a Completion
        with finish_reason "cancelled" (a waiting request gets it when its turn comes)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class _Active:
    request: Request
    text: RowText
    stops: StopMatcher
    generator: torch.Generator
    adapter: ServingAdapter | None
    budget: int
    pending: int  # the sampled token whose key/value is not yet in the cache
    first_token: float
    decode_start: float = 0.0


@dataclass
class BatcherStats:
    """Counters for metrics: steps, tokens, and the batch sizes seen."""

    steps: int = 0
    tokens: int = 0
    admitted: int = 0
    finished: int = 0
    batch_rows: int = 0  # sum over steps of the rows decoded (mean batch = batch_rows / steps)


class ContinuousBatcher:
    """Runs `engine`'s model over a changing batch of up to `max_batch` requests; up to
    `max_queue` more may wait for a row."""

    def __init__(
        self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, cache_len: int = 256
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be at least 1 and max_queue at least 0")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        config = engine.model.config
        self.cache = SlotCache(
            config.n_layers,
            max_batch,
            config.n_kv_heads,
            config.head_dim,
            max_len=cache_len,
            dtype=engine.cache_dtype,
        )
        self.rows: list[_Active | None] = [None] * max_batch
        self.stats = BatcherStats()
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        self._deltas: dict[str, LowRankDelta] | None = None

    # --- any thread -----------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        adapter: str | None = None,
        constraint: TokenConstraint | None = None,
    ) -> Request:
        """Queue a prompt; raises ValueError (bad prompt) or QueueFullError at once."""
        self.engine.check_prompts([prompt])
        if adapter is not None and self.engine.adapters is None:
            raise ValueError("this engine was built without an adapter cache")
        request = Request(list(prompt), params, adapter, sink, constraint, id=next(self._ids))
        with self._lock:
            free = self.cache.used.count(False)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFullError(f"{len(self._waiting)} requests already wait")
            self._waiting.append(request)
        self._wake.set()
        return request

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def cancel_all(self) -> None:
        """Cancel every running and waiting request (at the next step)."""
        with self._lock:
            waiting = list(self._waiting)
        for request in [*waiting, *(r.request for r in self.rows if r is not None)]:
            request.cancel()
        self._wake.set()

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until a request is submitted or cancelled, or `timeout` seconds pass."""
        self._wake.wait(timeout=timeout)
        self._wake.clear()

    def run(
        self,
        stop: threading.Event,
        after_step: Callable[[bool], None] | None = None,
        idle_s: float = 0.1,
    ) -> None:
        """Step until `stop` is set, sleeping (up to `idle_s`) while there is nothing to do;
        `after_step(stepped)` after each turn (for metrics)."""
        while not stop.is_set():
            stepped = self.step()
            if not stepped:
                self.wait_for_work(timeout=idle_s)
            if after_step is not None:
                after_step(stepped)

    # --- the model's thread ---------------------------------------------------------------

    def step(self) -> bool:
        """Admit waiting requests into free rows, then decode one token for every row.
        Returns False when there was nothing to do."""
        for slot, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self._finish(slot, "cancelled")
        with self._lock:
            dropped = [r for r in self._waiting if r.cancelled]
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        for request in dropped:
            _send(request, _cancelled_before_start(request))
        while (slot := self.cache.free_slot()) is not None and self._waiting:
            with self._lock:
                request = self._waiting.popleft()
            self._admit(slot, request)
        if self.active == 0:
            if not self._waiting:
                self.cache.shrink()
            return bool(self._waiting)
        self._decode()
        return True

    def _admit(self, slot: int, request: Request) -> None:
        """Prefill one request alone, sample its first token and place it in `slot`."""
        engine = self.engine
        try:
            adapter = None
            if engine.adapters is not None:
                adapter = engine.adapters.resolve_rows([request.adapter])[0]
            n = len(request.prompt)
            prompt_cache = KVCache(
                engine.model.config.n_layers, 1, n, dtype=engine.cache_dtype, device="cpu"
            )
            generator = seeded_generator(request.params.seed)
            with (
                self._overlaid(engine.prefill_model, overlay([adapter])),
                torch.inference_mode(),
                engine.prefill_autocast(),
            ):
                logits = engine.prefill_model(
                    torch.tensor([request.prompt]), prompt_cache, last_only=True
                )[:, -1]
                first = _choose(logits, request, generator)
        except Exception as error:  # the request fails, the batch goes on
            _send(request, error)
            return
        self.cache.place(slot, prompt_cache, n)
        with torch.inference_mode():  # the prompt's own copy, made in inference mode
            c = prompt_cache
            for store in (c.keys, c.values, c.key_scale, c.value_scale):
                if store is not None:
                    store.zero_()
        budget = min(request.params.max_tokens, engine.context_length - n)
        row = _Active(
            request,
            RowText(IncrementalDetokenizer(engine.tokenizer)),
            StopMatcher(request.params.stop),
            generator,
            adapter,
            budget,
            first,
            time.perf_counter(),
        )
        self.rows[slot] = row
        self._deltas = None
        self.stats.admitted += 1
        self._take(slot, first)

    def _overlaid(
        self, model: Transformer, deltas: dict[str, LowRankDelta]
    ) -> contextlib.AbstractContextManager[None]:
        """The rows' adapters on `model`; without an adapter cache, the model as it is."""
        if self.engine.adapters is None:
            return contextlib.nullcontext()
        return overlaid([model], deltas)

    def _take(self, slot: int, token: int) -> None:
        """Append a sampled token to a row, send its new text, finish it if it stopped."""
        row = self.rows[slot]
        assert row is not None
        last = len(row.text.token_ids) + 1 == row.budget
        piece = row.text.append(
            token,
            self.engine.tokenizer.stop_ids,
            row.stops,
            last=last,
            ignore_eos=row.request.params.ignore_eos,
        )
        row.pending = token
        self.stats.tokens += 1
        if piece:
            _send(row.request, piece)
        if row.text.finish_reason is not None:
            self._finish(slot, row.text.finish_reason)

    def _finish(self, slot: int, reason: str) -> None:
        row = self.rows[slot]
        assert row is not None
        now = time.perf_counter()
        self.rows[slot] = None
        self.cache.release(slot)
        self._deltas = None
        self.stats.finished += 1
        text = row.text
        if reason == "cancelled":
            text.text = text.text[: text.emitted]
        decoded = len(text.token_ids) - 1
        since_first = now - row.first_token
        ttft = row.first_token - row.request.submitted
        _send(
            row.request,
            Completion(
                text=text.text,
                token_ids=list(text.token_ids),
                prompt_tokens=len(row.request.prompt),
                finish_reason=reason,
                ttft_ms=ttft * 1e3,
                decode_tokens_per_s=decoded / since_first if decoded > 0 and since_first else 0.0,
                prefill_tokens_per_s=len(row.request.prompt) / ttft if ttft > 0 else 0.0,
            ),
        )
        text.token_ids.clear()

    def _decode(self) -> None:
        """One forward over rows [0, n) (n: one past the last busy row); idle rows in between
        compute on padding and are ignored."""
        n = max(i for i, r in enumerate(self.rows) if r is not None) + 1
        if self._deltas is None:
            self._deltas = overlay([r.adapter if r else None for r in self.rows[:n]])
        if n == 1 and self.cache.pad[0]:
            self.cache.compact()  # one row, no padding: the native decode kernels can take it
        pad_id = self.engine.tokenizer.eos_id or 0
        tokens = torch.tensor([[r.pending if r else pad_id] for r in self.rows[:n]])
        self.cache.reserve(1)
        view = self.cache.view(n)
        with (
            self._overlaid(self.engine.model, self._deltas),
            torch.inference_mode(),
            self.engine.decode_threads(),
        ):
            logits = self.engine.model(tokens, view, last_only=True)[:, -1]
        self.cache.length = view.length
        self.stats.steps += 1
        self.stats.batch_rows += self.active
        for slot, row in enumerate(self.rows[:n]):
            if row is None:
                continue
            try:
                with torch.inference_mode():
                    token = _choose(logits[slot : slot + 1], row.request, row.generator)
            except Exception as error:  # this request fails, the batch goes on
                self._finish(slot, "error")
                _send(row.request, error)
                continue
            self._take(slot, token)


def _choose(logits: torch.Tensor, request: Request, generator: torch.Generator) -> int:
    """The next token of one row (`logits` is `(1, vocab)`), within its constraint."""
    if request.constraint is not None:
        request.constraint.restrict(logits)
    token = int(sample_next(logits, request.params, generator)[0])
    if request.constraint is not None:
        request.constraint.accept(token)
    return token


def _send(request: Request, event: Event) -> None:
    """Give a request its event; a sink that fails cancels its request, not the batch."""
    try:
        request.sink(event)
    except Exception:
        request.cancel()


def _cancelled_before_start(request: Request) -> Completion:
    return Completion(
        text="",
        token_ids=[],
        prompt_tokens=len(request.prompt),
        finish_reason="cancelled",
        ttft_ms=0.0,
        decode_tokens_per_s=0.0,
        prefill_tokens_per_s=0.0,
    )
