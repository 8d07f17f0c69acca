"""Prefill and decode speed of the default base, against memory bandwidth and llama.cpp, as JSON.

Batch 1, a 256-token prompt, 128 new tokens, 2 threads. Each variant runs in its own process
(so peak memory is its own), `--repeats` times; medians are reported, and ratios are taken
between numbers measured in this same run. llama.cpp (llama-cpp-python) runs on the same GGUF
and the same prompt ids when it is installed; it is not a dependency.

    python benchmarks/bench_generate.py [--repeats 3] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PROMPT_TOKENS = 256
NEW_TOKENS = 128
VARIANTS = {
    # name: prefill dtype (weights, KV cache and decode are float32 in both)
    "float32": "float32",
    "float32+bf16-prefill": "bfloat16",
}
TEXT = (
    "The on-device model reads a message, finds what matters, and writes a short summary that a "
    "person can read at a glance. It must run on a phone with little memory, so its weights are "
    "compressed and small adapters specialise it for each task. "
)


def prompt_ids(tokenizer) -> list[int]:
    ids: list[int] = []
    while len(ids) < PROMPT_TOKENS:
        ids += tokenizer.encode(TEXT)
    return ids[:PROMPT_TOKENS]


def copy_bandwidth(threads: int, repeats: int = 7) -> float:
    """Bytes of a 512 MiB float32 array copied per second (each byte read once, written once)."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(128 * 1024 * 1024)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return src.nbytes / statistics.median(times)


def read_bandwidth(threads: int, repeats: int = 7) -> float:
    """Bytes per second streamed by a sum over a 512 MiB float32 array (read only)."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(128 * 1024 * 1024)
    src.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return src.nbytes / statistics.median(times)


def run_ours(variant: str, threads: int, repeats: int) -> dict:
    import torch

    from openafm.runtime import Engine, SamplingParams, load_pretrained

    torch.set_num_threads(threads)
    prefill = VARIANTS[variant]
    t0 = time.perf_counter()
    pretrained = load_pretrained()
    load_s = time.perf_counter() - t0
    model = pretrained.model
    engine = Engine(
        model,
        pretrained.tokenizer,
        prefill_dtype=getattr(torch, prefill),
    )
    ids = prompt_ids(pretrained.tokenizer)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    engine.generate([ids[:16]], SamplingParams(max_tokens=4))  # warm-up
    runs = [engine.generate([ids], params)[0] for _ in range(repeats)]
    weight_bytes = sum(p.nbytes for p in model.parameters())
    return {
        "variant": variant,
        "weights_dtype": "float32",
        "prefill_dtype": prefill,
        "load_s": round(load_s, 3),
        "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in runs),
        "ttft_ms": statistics.median(r.ttft_ms for r in runs),
        "ttft_ms_per_prompt_token": statistics.median(r.ttft_ms for r in runs) / PROMPT_TOKENS,
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "completion_tokens": runs[0].completion_tokens,
        "weight_bytes": weight_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "compile_s": 0.0,  # torch.compile is not used: measured slower here (see README)
    }


def run_llama_cpp(threads: int, repeats: int) -> dict:
    from llama_cpp import Llama

    from openafm.io import resolve_model
    from openafm.runtime import load_tokenizer_for

    ids = prompt_ids(load_tokenizer_for())
    llm = Llama(
        str(resolve_model()),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=512,
        n_batch=512,
        verbose=False,
    )
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill.append(PROMPT_TOKENS / (time.perf_counter() - t))
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        decode.append((NEW_TOKENS - 1) / (time.perf_counter() - t))
    return {
        "variant": "llama.cpp",
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def worker(args: argparse.Namespace) -> None:
    if args.worker == "llama.cpp":
        result = run_llama_cpp(args.threads, args.repeats)
    elif args.worker == "bandwidth":
        result = {
            "copy_bytes_per_s": copy_bandwidth(args.threads),
            "read_bytes_per_s": read_bandwidth(args.threads),
        }
    else:
        result = run_ours(args.worker, args.threads, args.repeats)
    print(json.dumps(result))


def spawn(name: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    bandwidth = spawn("bandwidth", args)
    results = {name: spawn(name, args) for name in VARIANTS}
    try:
        import llama_cpp  # noqa: F401

        llama = spawn("llama.cpp", args)
    except ImportError:
        llama = None
    assert bandwidth is not None
    bw = bandwidth["copy_bytes_per_s"]
    for r in results.values():
        if r is None:
            continue
        bound = bw / r["weight_bytes"]
        r["decode_bound_tokens_per_s"] = bound
        r["decode_fraction_of_bandwidth_bound"] = r["decode_tokens_per_s"] / bound
        if llama:
            r["prefill_vs_llama_cpp"] = r["prefill_tokens_per_s"] / llama["prefill_tokens_per_s"]
            r["decode_vs_llama_cpp"] = r["decode_tokens_per_s"] / llama["decode_tokens_per_s"]
    report = {
        "setup": {
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "batch": 1,
            "threads": args.threads,
            "repeats": args.repeats,
            "bandwidth_definition": "array bytes copied per second (each byte read and written once)",
        },
        "bandwidth": bandwidth,
        "ours": results,
        "llama_cpp": llama,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
