"""The transformer: KV-cache decoding equals the full forward, batching, ties, presets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openafm.model import KVCache, Linear, Transformer, get_preset
from openafm.model.linear import _use_onednn


def test_cached_decode_equals_full_forward(tiny):
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny(ids)
        cache = KVCache(tiny.config.n_layers, 1, 32)
        pieces = [tiny(ids[:, :10], cache), tiny(ids[:, 10:17], cache)]
        pieces += [tiny(ids[:, t : t + 1], cache) for t in range(17, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_separate_runs(tiny):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in (5, 12, 9)]
    width = 12
    batch = torch.stack([F.pad(p, (width - len(p), 0), value=0) for p in prompts])
    pad = torch.tensor([width - len(p) for p in prompts])
    nxt = torch.randint(0, 512, (3, 1), generator=gen)
    with torch.no_grad():
        cache = KVCache(tiny.config.n_layers, 3, 16, pad=pad)
        last = tiny(batch, cache)[:, -1]
        step = tiny(nxt, cache)[:, -1]
        for i, p in enumerate(prompts):
            alone = tiny(torch.cat([p, nxt[i]])[None])[0]
            torch.testing.assert_close(last[i], alone[-2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(step[i], alone[-1], atol=1e-5, rtol=1e-5)


def test_gqa_attention_equals_repeated_kv_heads(tiny):
    """GQA with 4 query and 2 KV heads equals plain attention with each KV head repeated."""
    attn = tiny.layers[0].attn
    x = torch.randn(2, 7, tiny.config.dim)
    cos, sin = tiny.rope(torch.arange(7))
    with torch.no_grad():
        ours = attn(x, cos, sin, None, 0, None)
        from openafm.model.rope import apply_rope

        hd = tiny.config.head_dim
        q = attn.q_norm(attn.q(x).view(2, 7, -1, hd).transpose(1, 2))
        k = attn.k_norm(attn.k(x).view(2, 7, -1, hd).transpose(1, 2))
        v = attn.v(x).view(2, 7, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        ref = attn.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, -1))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_tied_embedding_is_one_tensor(tiny):
    assert tiny.output.weight is tiny.embed.weight
    n_unique = sum(p.numel() for p in tiny.parameters())
    assert n_unique == tiny.config.num_params()


def test_every_projection_goes_through_the_linear_seam(tiny):
    linears = [m for m in tiny.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear) for m in linears)
    assert len(linears) == 7 * tiny.config.n_layers + 1


def test_inference_kernel_matches_the_training_path(tiny):
    """Without autograd, float32 projections run on oneDNN; outputs equal F.linear's."""
    ids = torch.randint(0, 512, (2, 9))
    with torch.enable_grad():
        reference = tiny(ids).detach()
    with torch.inference_mode():
        assert _use_onednn(ids.float(), tiny.output.weight) == torch.backends.mkldnn.is_available()
        fast = tiny(ids)
        one_token = tiny(ids[:, :1])
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_token, reference[:, :1], atol=1e-5, rtol=1e-5)


def test_afm_on_device_preset_matches_the_published_architecture():
    c = get_preset("afm-on-device-3b")
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == (26, 3072, 24, 8, 128)
    assert (c.vocab_size, c.rope_theta, c.qk_norm, c.tie_embeddings) == (
        49_152,
        500_000.0,
        True,
        True,
    )
    with torch.device("meta"):
        model = Transformer(c)
    assert sum(p.numel() for p in model.parameters()) == c.num_params()
    # Apple reports 2.58B non-embedding and 0.15B embedding parameters.
    assert abs(c.num_params(embeddings=False) / 1e9 - 2.58) < 0.1
    assert abs(c.vocab_size * c.dim / 1e9 - 0.15) < 0.01


def test_smollm2_preset_parameter_count():
    assert get_preset("smollm2-135m").num_params() == 134_515_008
