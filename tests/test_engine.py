"""The engine on a tiny model: batching, stops, streaming, context limits, UTF-8 safety."""

from __future__ import annotations

import pytest
import torch

from openafm.model import KVCache
from openafm.runtime import ContextLengthError, Engine, SamplingParams
from openafm.runtime.detokenize import IncrementalDetokenizer, StopMatcher
from tests.conftest import byte_tokenizer


@pytest.fixture
def engine(tiny):
    return Engine(tiny, byte_tokenizer())


def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by re-running the full forward (no cache) for every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_equals_uncached_argmax_loop(tiny, engine):
    prompt = [5, 17, 99, 3, 250, 8]
    (done,) = engine.generate([prompt], SamplingParams(max_tokens=12))
    expected = _greedy_reference(tiny, prompt, 12)
    if engine.tokenizer.eos_id in expected:  # the engine stops at the end-of-turn token
        expected = expected[: expected.index(engine.tokenizer.eos_id) + 1]
    assert done.token_ids == expected


def test_batch_of_different_lengths_equals_one_by_one(engine):
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47], [200]]
    params = SamplingParams(max_tokens=10)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [b.prompt_tokens for b in batched] == [3, 8, 1]


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    a = engine.generate([[1, 2, 3]], params)[0].token_ids
    b = engine.generate([[1, 2, 3]], params)[0].token_ids
    assert a == b


def test_stream_pieces_join_to_the_final_text(engine):
    ids = engine.encode("hello", chat=True)
    stream = engine.stream(ids, SamplingParams(max_tokens=20, temperature=1.0, seed=1))
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as done:
            completion = done.value
            break
    assert "".join(pieces) == completion.text
    assert completion.completion_tokens == len(completion.token_ids) > 0


def test_stop_string_truncates_and_is_never_streamed(engine):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=5)
    free = engine.generate([[10, 11, 12]], params)[0]
    assert len(free.text) >= 4, "need some text to pick a stop string from"
    stop = free.text[2:4]
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=5, stop=(stop,))
    stream = engine.stream([10, 11, 12], params)
    pieces = list(stream)
    text = "".join(pieces)
    assert stop not in text
    assert free.text.startswith(text) and text == free.text[: free.text.index(stop)]


def test_context_length_is_enforced(tiny, engine):
    limit = tiny.config.max_seq_len
    with pytest.raises(ContextLengthError, match="does not fit the context length"):
        engine.generate([[1] * limit], SamplingParams(max_tokens=1))
    (done,) = engine.generate([[1] * (limit - 3)], SamplingParams(max_tokens=50))
    assert done.completion_tokens <= 3
    if done.finish_reason == "length":
        assert done.completion_tokens == 3
    with pytest.raises(ValueError, match="KV cache full"):
        cache = KVCache(tiny.config.n_layers, 1, 4)
        tiny(torch.zeros(1, 5, dtype=torch.long), cache)


def test_bad_prompts_are_refused(engine):
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.generate([[100_000]])
    with pytest.raises(ValueError, match="not valid UTF-8"):
        engine.encode("bad \udcff surrogate", chat=False)


def test_incremental_detokenizer_never_splits_a_character():
    tok = byte_tokenizer()
    text = "héllo 🙂 日本 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: characters span tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher(["END", "\n\n"])
    assert m.safe_length("hello EN") == len("hello ")
    assert m.safe_length("hello\n") == len("hello")
    assert m.safe_length("hello") == 5
    assert m.find("abc END d") == 4


def test_bf16_prefill_twin_shares_the_embedding_and_stays_close(tiny):
    engine = Engine(tiny, byte_tokenizer(), prefill_dtype=torch.bfloat16)
    twin = engine.prefill_model
    # The embedding is shared memory, not a second copy.
    assert twin is not tiny and twin.embed.weight.data_ptr() == tiny.embed.weight.data_ptr()
    assert twin.layers[0].mlp.up.weight.dtype == torch.bfloat16
    assert tiny.layers[0].mlp.up.weight.dtype == torch.float32  # the decode model is untouched
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = twin(ids)
    with torch.no_grad():
        full = tiny(ids)
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    assert (low.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
