"""Adapter runtime and training costs on the default base, as JSON.

Measured with rank-16 adapters on all seven projections of every layer (random values, the
shipped adapters' shape), 2 threads unless `--threads`:
- load: reading one adapter from disk into the cache (checked and converted), ms;
- switch: overlaying a different cached adapter onto the model's seams and removing it, ms;
- decode: tokens/s of batch-1 greedy decoding with an adapter vs the plain base (interleaved
  runs, ratio of medians);
- mixed batch: decode tokens/s of 4 requests with 4 different adapters vs the same 4 requests
  with one adapter;
- training: LoRA SFT tokens/s (batch 8 of real e-mail prompts, bf16 autocast) and the
  process's peak resident memory.

    python benchmarks/bench_adapters.py [--repeats 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from openafm.adapters import LoraAdapter, LoraConfig, save_adapter
from openafm.adapters.sft_data import tokenize_all
from openafm.adapters.trainer import TrainConfig, train_adapter
from openafm.features import get_feature
from openafm.runtime import AdapterCache, Engine, SamplingParams, load_pretrained
from openafm.runtime.adapter_cache import overlaid, overlay

NEW_TOKENS = 64
EMAIL = (
    "Hi all, the quarterly review moved to Thursday at 3pm in room 4B. Please bring the updated"
    " forecasts and the list of open contract issues, and send me your slides by Wednesday noon"
    " so I can merge them. Thanks, Sara"
)


def random_adapter(model, name: str, seed: int) -> LoraAdapter:
    adapter = LoraAdapter.fresh(name, model, LoraConfig(), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in adapter.pairs.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    return adapter


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def decode_rate(engine: Engine, prompts, adapters) -> float:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    done = engine.generate(prompts, params, adapters=adapters)
    return sum(c.decode_tokens_per_s for c in done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pretrained = load_pretrained()
    model, tok = pretrained.model, pretrained.tokenizer
    signature = pretrained.signature()
    root = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    names = [f"a{i}" for i in range(4)]
    for i, name in enumerate(names):
        adapter = random_adapter(model, name, i)
        adapter.metadata["base_signature"] = signature
        save_adapter(adapter, root / name)

    def cache() -> AdapterCache:
        return AdapterCache(model, signature, resolve=lambda n: root / n)

    load_ms = median_ms(lambda: cache().get("a0"), args.repeats)
    warm = cache()
    rows = [[warm.get(n)] for n in names[:2]]

    def switch() -> None:
        for row in rows:
            with overlaid([model], overlay(row)):
                pass

    switch_ms = median_ms(switch, args.repeats) / len(rows)

    engine = Engine(model, tok, adapters=warm)
    prompt = tok.encode_chat([{"role": "user", "content": EMAIL}])
    decode_rate(engine, [prompt], None)  # warm-up
    base, adapted = [], []
    for _ in range(args.repeats):
        base.append(decode_rate(engine, [prompt], None))
        adapted.append(decode_rate(engine, [prompt], "a0"))
    same, mixed = [], []
    for _ in range(args.repeats):
        same.append(decode_rate(engine, [prompt] * 4, ["a0"] * 4))
        mixed.append(decode_rate(engine, [prompt] * 4, names))

    records = [{"email": EMAIL, "ann0": "quarterly review moved to thursday"}] * 64
    conversations = get_feature("summarize-email").training_conversations(records)
    examples, _ = tokenize_all(tok, conversations, 512)
    trainee = LoraAdapter.fresh("train", model, LoraConfig())
    result = train_adapter(
        model,
        trainee,
        examples,
        root / "run",
        TrainConfig(steps=args.train_steps, batch_size=8, checkpoint_every=10_000),
        pad_id=tok.eos_id or 0,
        data_checksum="bench",
    )

    out = {
        "threads": args.threads,
        "repeats": args.repeats,
        "adapter_parameters": trainee.num_parameters,
        "adapter_file_bytes": (root / "a0" / "adapter.safetensors").stat().st_size,
        "load_ms": round(load_ms, 2),
        "switch_ms": round(switch_ms, 3),
        "decode_tokens_per_s_base": round(statistics.median(base), 2),
        "decode_tokens_per_s_adapter": round(statistics.median(adapted), 2),
        "decode_ratio_adapter_vs_base": round(
            statistics.median(adapted) / statistics.median(base), 3
        ),
        "batch4_tokens_per_s_one_adapter": round(statistics.median(same), 2),
        "batch4_tokens_per_s_four_adapters": round(statistics.median(mixed), 2),
        "batch4_ratio_four_vs_one": round(statistics.median(mixed) / statistics.median(same), 3),
        "train_tokens_per_s": round(result.tokens / result.seconds, 1),
        "train_peak_rss_mb": round(result.peak_rss_mb),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
