"""The native decoder stack: against its PyTorch reference under every instruction set, against
the module-by-module model, following adapter changes, and refusing what it cannot compute."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from openafm import kernels
from openafm.adapters.lora import column_major
from openafm.kernels.decoder import DecoderStack, StackLayer, StackShape
from openafm.model import KVCache, Linear, LowRankDelta, Transformer
from openafm.model.compressed import PalettizedWeight, pack_indices
from openafm.model.native_decode import stack_for
from openafm.runtime import Engine, PromptLookup, SamplingParams
from tests.conftest import byte_tokenizer, make_tiny

ISAS = kernels.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="no native kernels (no compiler here)")


def _palettized_tiny(seed: int = 0) -> Transformer:
    """The tiny model (qk-norm, grouped-query attention) with every projection palettized, in
    every supported width, and a rank-4 LoRA update on some (float32 or bfloat16 factors, B
    row- or column-major)."""
    model = make_tiny(seed)
    gen = torch.Generator().manual_seed(seed)
    linears = [m for m in model.layers.modules() if isinstance(m, Linear)]
    for i, linear in enumerate(linears):
        bits = kernels.SUPPORTED_BITS[i % len(kernels.SUPPORTED_BITS)]
        out, cols = linear.out_features, linear.in_features
        indices = torch.randint(0, 1 << bits, (out, cols), generator=gen)
        tables = (torch.randn(out // 16, 1 << bits, generator=gen) * 0.2).half()
        scale = (torch.rand(out, generator=gen) + 0.5).half()
        weight = PalettizedWeight(
            pack_indices(indices, bits), tables, scale, bits=bits, group_size=16, in_features=cols
        )
        linear.compress(weight)
        if i % 3:
            dtype = torch.bfloat16 if i % 4 == 1 else torch.float32
            a = (torch.randn(4, cols, generator=gen) * 0.1).to(dtype)
            b = (torch.randn(out, 4, generator=gen) * 0.1).to(dtype)
            linear.delta = LowRankDelta(a, column_major(b) if i % 2 else b, 0.5)
    return model.eval()


def _float_tables(layer: StackLayer) -> StackLayer:
    projections = tuple(replace(p, int8_tables=None) for p in layer.projections)
    return replace(layer, projections=projections)


@contextmanager
def module_by_module(model: Transformer):
    """A hook on a layer: the model then runs its modules one by one (the stack's reference)."""
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: None)
    try:
        yield
    finally:
        handle.remove()


def _steps(model: Transformer, tokens: torch.Tensor, chunks: list[int]) -> list[torch.Tensor]:
    """Logits of a 20-token prefill (module path: too many rows), then of each chunk."""
    cache = KVCache(model.config.n_layers, 1, 64)
    out = [model(tokens[:, :20], cache)]
    start = 20
    for n in chunks:
        out.append(model(tokens[:, start : start + n], cache))
        start += n
    return out


@pytest.mark.parametrize("mode", ["default", "fast"])
def test_the_native_stack_equals_its_reference_under_every_instruction_set(mode):
    model = _palettized_tiny()
    h = torch.randn(1, 3, model.config.dim)
    with torch.inference_mode(), kernels.using(mode):
        stack = stack_for(model, h, KVCache(model.config.n_layers, 1, 32))
        assert stack is not None
        fast = any(p.int8_tables is not None for p in stack.layers[0].projections)
        assert fast == (mode == "fast" and kernels.int8_tables_apply())
        for isa in ISAS:
            layers = stack.layers  # without int8 tables where this path has no integer kernel
            if not kernels.int8_tables_apply(isa):
                layers = [_float_tables(layer) for layer in layers]
            reference = DecoderStack(layers, stack.shape, native=False)
            native = DecoderStack(stack.layers, stack.shape, isa=kernels.ISA_CODES[isa])
            for tokens, pos in [(1, 0), (1, 9), (5, 3), (16, 7)]:
                shape = (model.config.n_layers, 1, model.config.n_kv_heads, 32, 16)
                keys, values = torch.randn(shape), torch.randn(shape)
                want_keys, want_values = keys.clone(), values.clone()
                h = torch.randn(tokens, model.config.dim)
                cos, sin = (t[pos : pos + tokens] for t in (model.rope.cos, model.rope.sin))
                got = native(h, keys, values, pos, cos, sin)
                want = reference(h, want_keys, want_values, pos, cos, sin)
                # (int16 activations: a last-bit difference upstream can move one by a step)
                for a, b in ((got, want), (keys, want_keys), (values, want_values)):
                    assert (a - b).abs().max() < 2e-4 * b.abs().max()


@pytest.mark.parametrize("mode", ["default", "fast"])
def test_decoding_through_the_stack_follows_the_module_by_module_model(mode):
    model = _palettized_tiny()
    tokens = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.inference_mode(), kernels.using(mode):
        h = model.embed(tokens[:, :1])
        cache = KVCache(model.config.n_layers, 1, 8)
        assert stack_for(model, h, cache) is not None
        with module_by_module(model):
            assert stack_for(model, h, cache) is None
            want = _steps(model, tokens, [1, 5, 1, 16])
        got = _steps(model, tokens, [1, 5, 1, 16])
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() < 1e-4 * w.abs().max()
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_the_stack_follows_adapter_changes_and_keeps_itself_for_the_same_adapter():
    model = _palettized_tiny()
    tokens = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.inference_mode():
        h = model.embed(tokens[:, :1])
        cache = KVCache(model.config.n_layers, 1, 8)
        first = stack_for(model, h, cache)
        for linear in model.layers.modules():  # the same factors in new deltas (per request)
            if isinstance(linear, Linear) and linear.delta is not None:
                d = linear.delta
                linear.delta = LowRankDelta(d.a, d.b, d.scale)
        assert stack_for(model, h, cache) is first
        for linear in model.layers.modules():
            if isinstance(linear, Linear):
                linear.delta = None
        assert stack_for(model, h, cache) is not first
        got = _steps(model, tokens, [1, 3])
        with module_by_module(model):
            want = _steps(model, tokens, [1, 3])
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() < 1e-4 * w.abs().max()


def test_greedy_speculation_through_the_stack_is_token_for_token_plain_decoding():
    model = _palettized_tiny()
    tokenizer = byte_tokenizer()
    plain = Engine(model, tokenizer, tune_threads=False)
    fast = Engine(model, tokenizer, speculation=PromptLookup(max_draft=6), tune_threads=False)
    for text in ("abcabcabcabc", "the cat sat on the mat, the cat"):
        ids = fast.encode(text, chat=False)
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        assert (
            fast.generate([ids], params)[0].token_ids == plain.generate([ids], params)[0].token_ids
        )


def test_what_the_stack_cannot_compute_runs_module_by_module():
    model = _palettized_tiny()
    one = model.embed(torch.zeros(1, 1, dtype=torch.long))
    n = model.config.n_layers
    with torch.inference_mode():
        assert stack_for(model, one, KVCache(n, 1, 8)) is not None
        assert stack_for(model, one.expand(2, 1, -1), KVCache(n, 2, 8)) is None  # a batch
        assert stack_for(model, one, KVCache(n, 1, 8, dtype=torch.int8)) is None
        assert stack_for(model, one.expand(1, 17, -1), KVCache(n, 1, 32)) is None  # prefill
        with kernels.using("reference"):
            assert stack_for(model, one, KVCache(n, 1, 8)) is None
    with torch.no_grad():  # not inference mode: tests and trainers compare exact PyTorch values
        assert stack_for(model, one, KVCache(n, 1, 8)) is None
    model.layers[1].mlp.down.compressed = None  # one dense projection
    model.layers[1].mlp.down.weight = torch.nn.Parameter(torch.randn(64, 128))
    with torch.inference_mode():
        assert stack_for(model, one, KVCache(n, 1, 8)) is None


def test_a_stack_of_the_wrong_shape_is_refused_clearly():
    model = _palettized_tiny()
    with torch.inference_mode():
        stack = stack_for(model, model.embed(torch.zeros(1, 1, dtype=torch.long)), KVCache(2, 1, 8))
    assert stack is not None
    with pytest.raises(RuntimeError, match="do not fit the heads"):
        DecoderStack(stack.layers, StackShape(heads=2, kv_heads=1, head_dim=16, eps=1e-5))
    keys = torch.zeros(2, 1, 2, 4, 16)
    h, cos = torch.randn(1, 64), torch.randn(1, 16)
    with pytest.raises(RuntimeError, match="exceed the cache"):
        stack(h, keys, keys.clone(), 4, cos, cos)


def test_a_lone_request_of_the_continuous_batcher_decodes_through_the_stack():
    from openafm.runtime.continuous import ContinuousBatcher
    from tests.test_continuous import Collector, _drain

    model = _palettized_tiny()
    engine = Engine(model, byte_tokenizer(), tune_threads=False)
    batcher = ContinuousBatcher(engine, max_batch=3)
    one = model.embed(torch.zeros(1, 1, dtype=torch.long))
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    first, second = Collector(), Collector()
    batcher.submit([5, 6, 7, 8], params, first)
    for _ in range(3):
        batcher.step()
    with torch.inference_mode():
        assert stack_for(model, one, batcher.cache.view(1)) is not None
    batcher.submit(list(range(20, 32)), SamplingParams(max_tokens=4, ignore_eos=True), second)
    for _ in range(6):  # the second joins with a longer prompt, finishes, and leaves
        batcher.step()
    assert batcher.active == 1
    batcher.step()  # alone again: its padding is dropped
    with torch.inference_mode():
        assert stack_for(model, one, batcher.cache.view(1)) is not None
    _drain(batcher)
    assert first.done.token_ids == engine.generate([[5, 6, 7, 8]], params)[0].token_ids
