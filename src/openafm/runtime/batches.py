"""Many prompts through the engine in batches of similar length, answers in input order."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from openafm.runtime.engine import Completion, Engine
from openafm.runtime.journal import AnswerJournal
from openafm.runtime.sampling import SamplingParams


def generate_in_batches(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    adapter: str | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    journal: AnswerJournal | None = None,
) -> list[Completion]:
    """Completions of `prompts`, generated `batch_size` at a time, shortest prompts first (less
    padding per batch); `on_batch(n)` after each batch of n. With a `journal`, batches it holds
    are taken from it and each new one is recorded in it."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    known = journal.known if journal is not None else {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        if all(i in known for i in batch):
            done = [known[i] for i in batch]
        else:
            done = engine.generate([prompts[i] for i in batch], params, adapters=adapter)
            if journal is not None:
                journal.record(batch, done)
        for i, completion in zip(batch, done, strict=True):
            out[i] = completion
        if on_batch is not None:
            on_batch(len(batch))
    return [c for c in out if c is not None]


def greedy_chat_responses(
    engine: Engine,
    prompts: Sequence[str],
    *,
    max_tokens: int,
    adapter: str | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    journal: AnswerJournal | None = None,
) -> tuple[list[Completion], dict[str, object]]:
    """Greedy answers to single-turn chat prompts, and the decoding settings used."""
    ids = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    done = generate_in_batches(
        engine,
        ids,
        params,
        adapter=adapter,
        batch_size=batch_size,
        on_batch=on_batch,
        journal=journal,
    )
    decoding = {"temperature": 0.0, "max_tokens": max_tokens, "chat_template": True}
    return done, decoding


def generate_continuously(
    engine: Engine,
    requests: Sequence[tuple[Sequence[int], SamplingParams, str | None]],
    *,
    max_batch: int = 16,
    on_done: Callable[[int, Completion], None] | None = None,
) -> list[Completion]:
    """Completions of (prompt ids, params, adapter) requests through a continuous batch: a row
    that stops is refilled at once, so answers of very different lengths waste no decode steps.
    Each request's output is what `engine.generate` gives it alone (its own seed, adapter and
    stops); `on_done(index, completion)` as each finishes."""
    from openafm.runtime.continuous import ContinuousBatcher

    longest = max((len(p) + params.max_tokens for p, params, _ in requests), default=1)
    batcher = ContinuousBatcher(
        engine, max_batch=max_batch, max_queue=len(requests), cache_len=longest
    )
    out: list[Completion | None] = [None] * len(requests)
    errors: list[BaseException] = []

    def sink_for(index: int) -> Callable[[object], None]:
        def sink(event: object) -> None:
            if isinstance(event, BaseException):
                errors.append(event)
            elif isinstance(event, Completion):
                out[index] = event
                if on_done is not None:
                    on_done(index, event)

        return sink

    for index, (prompt, params, adapter) in enumerate(requests):
        batcher.submit(prompt, params, sink_for(index), adapter=adapter)
    while batcher.step():
        if errors:
            batcher.cancel_all()
    if errors:
        raise errors[0]
    return [c for c in out if c is not None]
