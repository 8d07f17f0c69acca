"""The compressed model against the dense base it came from, side by side in one run, as JSON.

- size: bytes of the compressed directory's weights on disk, and of the loaded model's
  tensors in memory (plus the resident-memory rise when loading it), vs the dense model at
  float16 and at float32 (what the runtime holds);
- decode: batch-1 greedy tokens/s of the compressed model (with and without its recovery
  adapter) vs the dense model, interleaved runs, ratios of medians. The compressed model
  rebuilds each weight from its tables inside every product (no kernel yet), so expect it to be
  slower on a CPU;
- build times recorded by the commands: compression and recovery training wall time.

    python benchmarks/bench_compress.py --model DIR [--repeats 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from openafm.adapters import detach
from openafm.io.compressed_checkpoint import WEIGHTS_FILE, bits_summary
from openafm.runtime import SamplingParams, engine_for, load_pretrained

PROMPT = "Explain in two sentences why small language models can run on a phone."
NEW_TOKENS = 48


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode_tokens_per_s(engine, ids, adapters=None) -> float:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return engine.generate([ids], params, adapters=adapters)[0].decode_tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="compressed model directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    before = rss_bytes()
    compressed = load_pretrained(args.model)
    compressed_rss = rss_bytes() - before
    before = rss_bytes()
    dense = load_pretrained(
        json.loads((Path(args.model) / "compression.json").read_text())["made_with"]["base"]
    )
    dense_rss = rss_bytes() - before
    n_weights = bits_summary(dense.model)["total_weights"]

    engines = {
        "dense": engine_for(dense),
        "compressed": engine_for(compressed),
    }
    ids = engines["dense"].encode(PROMPT)
    runs: dict[str, list[float]] = {"dense": [], "compressed": [], "compressed_no_recovery": []}
    for name in runs:  # warm-up
        decode_tokens_per_s(engines["dense" if name == "dense" else "compressed"], ids)
    for _ in range(args.repeats):
        runs["dense"].append(decode_tokens_per_s(engines["dense"], ids))
        runs["compressed"].append(decode_tokens_per_s(engines["compressed"], ids))
        saved = compressed.default_adapter
        engines["compressed"].adapters.default = None
        detach(compressed.model)
        runs["compressed_no_recovery"].append(decode_tokens_per_s(engines["compressed"], ids))
        engines["compressed"].adapters.default = None if saved is None else str(saved)
    medians = {k: statistics.median(v) for k, v in runs.items()}

    meta = json.loads((Path(args.model) / "compression.json").read_text())
    recovery_meta = Path(args.model) / "recovery" / "adapter.json"
    recovery = json.loads(recovery_meta.read_text())["training"] if recovery_meta.exists() else {}
    result = {
        "model": str(args.model),
        "threads": args.threads,
        "bpw": meta["bpw"],
        "bpw_total": meta["bpw_total"],
        "disk_bytes": (Path(args.model) / WEIGHTS_FILE).stat().st_size,
        "dense_float16_bytes": n_weights * 2,
        "disk_vs_float16": (Path(args.model) / WEIGHTS_FILE).stat().st_size / (n_weights * 2),
        "memory_tensor_bytes": tensor_bytes(compressed.model),
        "dense_memory_tensor_bytes": tensor_bytes(dense.model),
        "memory_vs_dense_float32": tensor_bytes(compressed.model) / tensor_bytes(dense.model),
        "rss_rise_bytes": compressed_rss,
        "dense_rss_rise_bytes": dense_rss,
        "decode_tokens_per_s": medians,
        "decode_ratio_vs_dense": medians["compressed"] / medians["dense"],
        "decode_ratio_no_recovery_vs_dense": medians["compressed_no_recovery"] / medians["dense"],
        "compress_seconds": meta["made_with"].get("seconds"),
        "recovery_seconds": recovery.get("seconds"),
        "recovery_tokens": recovery.get("tokens"),
        "recovery_device": recovery.get("device", "cpu"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
