"""Continuous batching on the tiny model: requests that join and leave a running batch get
exactly what they get alone, with their own settings and adapters; cancelled rows are freed
and zeroed; a full queue and a prompt over the context are refused at once."""

from __future__ import annotations

import threading

import pytest
import torch

from openafm.adapters import save_adapter
from openafm.runtime import Completion, ContextLengthError, Engine, SamplingParams
from openafm.runtime.continuous import ContinuousBatcher, QueueFullError
from tests.conftest import byte_tokenizer
from tests.test_adapters import make_engine, random_adapter


class Collector:
    """A sink that keeps a request's pieces and its completion."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.done: Completion | None = None
        self.error: BaseException | None = None

    def __call__(self, event: object) -> None:
        if isinstance(event, Completion):
            self.done = event
        elif isinstance(event, BaseException):
            self.error = event
        else:
            self.pieces.append(event)  # type: ignore[arg-type]


def _drain(batcher: ContinuousBatcher, limit: int = 2000) -> None:
    for _ in range(limit):
        if not batcher.step():
            return
    raise AssertionError("the batcher did not finish")


PROMPTS = [[1, 2, 3], list(range(40, 80)), [200], [7] * 12, list(range(90, 150))]


def test_requests_joining_at_different_steps_get_what_they_get_alone(tiny):
    engine = Engine(tiny, byte_tokenizer(), tune_threads=False)
    batcher = ContinuousBatcher(engine, max_batch=3, cache_len=16)  # grows and compacts
    settings = [
        SamplingParams(max_tokens=30, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=50, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.7, top_k=20, seed=9, ignore_eos=True),
        SamplingParams(max_tokens=25, ignore_eos=True),
    ]
    sinks = [Collector() for _ in PROMPTS]
    batcher.submit(PROMPTS[0], settings[0], sinks[0])
    for _ in range(5):
        batcher.step()
    for i in (1, 2, 3):  # the longer prompt shifts the running row right; one must wait
        batcher.submit(PROMPTS[i], settings[i], sinks[i])
    for _ in range(3):
        batcher.step()
    batcher.submit(PROMPTS[4], settings[4], sinks[4])
    largest = 0
    while batcher.step():
        largest = max(largest, batcher.cache.max_len)
    for prompt, params, sink in zip(PROMPTS, settings, sinks, strict=True):
        (alone,) = engine.generate([prompt], params)
        assert sink.done is not None and sink.error is None
        assert sink.done.token_ids == alone.token_ids
        assert "".join(sink.pieces) == sink.done.text == alone.text
        assert sink.done.finish_reason == "length"
    assert batcher.active == 0 and batcher.stats.finished == 5
    assert 1 < batcher.stats.batch_rows / batcher.stats.steps <= 3
    assert largest > 16  # the cache grew, and once idle went back to its first size
    config = tiny.config
    first_size = 2 * 3 * config.n_layers * config.n_kv_heads * 16 * config.head_dim * 4
    assert batcher.cache.max_len == 16 and batcher.cache.nbytes() == first_size


def test_rows_with_different_adapters_match_each_adapter_alone(tmp_path, tiny):
    root = tmp_path / "adapters"
    save_adapter(random_adapter(tiny, "alpha", 1), root / "alpha")
    save_adapter(random_adapter(tiny, "beta", 2, rank=4, targets=("q", "v", "down")), root / "beta")
    engine = make_engine(tiny, root)
    engine.threads = None
    batcher = ContinuousBatcher(engine, max_batch=4)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    choices = ["alpha", None, "beta", "alpha"]
    sinks = [Collector() for _ in choices]
    for i, (name, sink) in enumerate(zip(choices, sinks, strict=True)):
        batcher.submit(PROMPTS[i], params, sink, adapter=name)
        batcher.step()
    _drain(batcher)
    for i, (name, sink) in enumerate(zip(choices, sinks, strict=True)):
        (alone,) = engine.generate([PROMPTS[i]], params, adapters=name)
        assert sink.done is not None and sink.done.token_ids == alone.token_ids, name
    unknown = Collector()
    batcher.submit([1, 2], params, unknown, adapter="gamma")
    _drain(batcher)
    assert unknown.error is not None and unknown.done is None and batcher.active == 0


def test_stop_strings_apply_per_row(tiny):
    engine = Engine(tiny, byte_tokenizer(), tune_threads=False)
    (free,) = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=40, ignore_eos=True))
    stop = free.text[10:12]
    batcher = ContinuousBatcher(engine)
    stopped, running = Collector(), Collector()
    batcher.submit([5, 6, 7], SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True), stopped)
    batcher.submit([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), running)
    _drain(batcher)
    assert stopped.done.finish_reason == "stop" and stop not in stopped.done.text
    assert free.text.startswith(stopped.done.text) and running.done.text == free.text


def test_a_cancelled_request_frees_and_zeroes_its_row(tiny):
    engine = Engine(tiny, byte_tokenizer(), tune_threads=False)
    batcher = ContinuousBatcher(engine, max_batch=2)
    kept, dropped = Collector(), Collector()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    batcher.submit([1, 2, 3], params, kept)
    request = batcher.submit([9, 8, 7, 6], params, dropped)
    for _ in range(4):
        batcher.step()
    request.cancel()
    batcher.step()
    assert dropped.done is not None and dropped.done.finish_reason == "cancelled"
    assert dropped.done.text == "".join(dropped.pieces)
    assert batcher.active == 1 and not batcher.cache.used[1]
    keys = batcher.cache.view(2).keys
    assert keys is not None and not keys[:, 1, :, : batcher.cache.length - 1].any()
    _drain(batcher)
    (alone,) = engine.generate([[1, 2, 3]], params)
    assert kept.done.token_ids == alone.token_ids
    assert not batcher.cache.view(2).keys.any()  # every row zeroed once all are done


def test_bad_prompts_and_a_full_queue_are_refused_at_submit(tiny):
    engine = Engine(tiny, byte_tokenizer(), tune_threads=False)
    batcher = ContinuousBatcher(engine, max_batch=1, max_queue=1)
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ContextLengthError):
        batcher.submit([1] * tiny.config.max_seq_len, params, Collector())
    with pytest.raises(ValueError, match="without an adapter cache"):
        batcher.submit([1], params, Collector(), adapter="alpha")
    batcher.submit([1], params, Collector())
    batcher.submit([2], params, Collector())
    with pytest.raises(QueueFullError):
        batcher.submit([3], params, Collector())


def test_the_loop_serves_submissions_from_other_threads(tiny):
    engine = Engine(tiny, byte_tokenizer(), tune_threads=False)
    batcher = ContinuousBatcher(engine, max_batch=4)
    stop = threading.Event()
    loop = threading.Thread(target=batcher.run, args=(stop,))
    loop.start()
    try:
        finished = [threading.Event() for _ in range(6)]
        sinks = []
        for i, event in enumerate(finished):
            sink = Collector()

            def notify(e: object, sink: Collector = sink, event: threading.Event = event) -> None:
                sink(e)
                if isinstance(e, Completion | BaseException):
                    event.set()

            sinks.append(sink)
            batcher.submit([i + 1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True), notify)
        assert all(e.wait(timeout=60) for e in finished)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    for i, sink in enumerate(sinks):
        (alone,) = engine.generate([[i + 1, 2, 3]], SamplingParams(max_tokens=10, ignore_eos=True))
        assert sink.done.token_ids == alone.token_ids


def test_slot_cache_positions_survive_shifts_and_growth():
    from openafm.model import KVCache
    from openafm.model.slot_cache import SlotCache

    cache = SlotCache(2, 2, 1, 4, max_len=4)
    prompt = KVCache(2, 1, 3)
    prompt.keys = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 1, 3, 4)
    prompt.values = -prompt.keys
    cache.place(0, prompt, 3)
    longer = KVCache(2, 1, 5)
    longer.keys = torch.ones(2, 1, 1, 5, 4)
    longer.values = torch.ones(2, 1, 1, 5, 4)
    cache.place(1, longer, 5)  # shifts row 0 right by two and grows the storage
    view = cache.view(2)
    assert cache.length == 5 and cache.pad.tolist() == [2, 0]
    assert torch.equal(view.keys[:, 0, :, 2:5], prompt.keys[:, 0])
    assert not view.keys[:, 0, :, :2].any()
    cache.release(1)
    cache.reserve(cache.max_len)  # compacts row 0 back to position 0 before growing
    assert cache.pad.tolist()[0] == 0 and cache.length == 3
    assert torch.equal(cache.view(1).keys[:, 0, :, :3], prompt.keys[:, 0])
    assert cache.view(1).keys.is_contiguous()  # a lone row can go to the native decode kernels
    assert not cache.view(2).keys.is_contiguous()
