"""Load on `afm serve` in the style of vLLM's benchmark_serving.py: streamed chat requests at
concurrency 1, 4, 16 and 64 (a mix of the base and its feature adapters), measuring TTFT, TPOT
and ITL (p50/p99), requests/s and output tokens/s; ratios against concurrency 1 from the same
run. The busiest level runs twice: the server's resident memory after the second run against
after the first is the leak check. Starts a real server on a free loopback port; load goes
nowhere else and is bounded. Prints JSON with the CPU's flags.

    python benchmarks/bench_serve.py [--model smollm2-135m-instruct] [--max-batch 16]
        [--levels 1,4,16,64] [--max-tokens 64] [--fixed-length] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import cpu  # noqa: E402

EMAILS = ROOT / "tests" / "fixtures" / "summaries" / "aeslc_test_head4.jsonl"
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "Give three tips for staying focused while working from home.",
    "Explain what a binary search does, briefly.",
]


def _prompts() -> list[str]:
    emails = [json.loads(line)["email"] for line in EMAILS.read_text().splitlines()]
    return [f"Summarize this e-mail:\n\n{e[:1200]}" for e in emails] + QUESTIONS


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, fixed: bool
) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": fixed,
    }
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    ttft = (stamps[0] - start) if stamps else end - start
    return {
        "ttft": ttft,
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "tpot": (end - start - ttft) / (tokens - 1) if tokens > 1 else 0.0,
        "tokens": tokens,
    }


async def _level(
    url: str, models: list[str], concurrency: int, requests: int, max_tokens: int, fixed: bool
) -> dict:
    prompts = _prompts()
    jobs = [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        errors = 0

        async def worker() -> None:
            nonlocal errors
            while not queue.empty():
                model, prompt = queue.get_nowait()
                try:
                    results.append(await _one(client, url, model, prompt, max_tokens, fixed))
                except httpx.HTTPError:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results]
    itls = [x for r in results for x in r["itl"]]
    tpots = [r["tpot"] for r in results if r["tpot"] > 0]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(results) / seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_ms": round(1e3 * _percentile(ttfts, 0.5), 1),
        "ttft_p99_ms": round(1e3 * _percentile(ttfts, 0.99), 1),
        "tpot_p50_ms": round(1e3 * statistics.median(tpots), 1) if tpots else None,
        "itl_p50_ms": round(1e3 * _percentile(itls, 0.5), 1),
        "itl_p99_ms": round(1e3 * _percentile(itls, 0.99), 1),
    }


def _rss_mb(pid: int | None) -> float | None:
    """The server's resident memory (Linux), or None when it runs elsewhere."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(model: str, max_batch: int, threads: int):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "openafm", "serve", "--model", model]
    command += ["--port", str(port), "--max-batch", str(max_batch), "--max-queue", "256"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--fixed-length",
        action="store_true",
        help="every answer runs to --max-tokens (ignore_eos, as vLLM's benchmark --ignore-eos)",
    )
    parser.add_argument("--url", help="measure a server that already runs (no start/stop)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    with contextlib.ExitStack() as stack:
        url, pid = args.url, None
        if url is None:
            url, pid = stack.enter_context(_server(args.model, args.max_batch, args.threads))
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        asyncio.run(_level(url, models, 1, 2, 8, False))  # warm-up
        rows = []
        for concurrency in levels:
            requests = min(max(8, 2 * concurrency), 128)
            row = asyncio.run(
                _level(url, models, concurrency, requests, args.max_tokens, args.fixed_length)
            )
            row["server_rss_mb"] = _rss_mb(pid)
            rows.append(row)
            print(f"  {row}", file=sys.stderr)
        # a leak check: the busiest level once more; memory after it against after the first
        top = max(levels)
        again = asyncio.run(
            _level(url, models, top, min(2 * top, 128), args.max_tokens, args.fixed_length)
        )
        again["server_rss_mb"] = _rss_mb(pid)
    base = rows[0]
    for row in rows:
        row["output_tokens_per_s_vs_first"] = round(
            row["output_tokens_per_s"] / base["output_tokens_per_s"], 2
        )
        row["ttft_p99_vs_first"] = round(row["ttft_p99_ms"] / base["ttft_p99_ms"], 2)
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "model": args.model,
                "models_in_mix": models,
                "max_batch": args.max_batch,
                "max_tokens": args.max_tokens,
                "fixed_length": args.fixed_length,
                "threads": args.threads,
                "cpu": cpu(),
                "levels": rows,
                "repeat_of_busiest_level": again,
                "rss_after_repeat_vs_after_first": None
                if pid is None
                else round(again["server_rss_mb"] / rows[levels.index(top)]["server_rss_mb"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
