"""Speed of the curation pipeline on real pages, as JSON: whole run, per stage, MinHash.

Runs the default pipeline (no robots snapshots, no quality model, no evaluation sets) over the
given inputs with 1 and 2 local workers and with Ray (2 CPUs), each in its own process and
output folder; ratios are taken between runs of this same invocation.

    python benchmarks/bench_curate.py [--input ../shared/data/web-html/pages ../shared/data/warc]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_INPUTS = ["../shared/data/web-html/pages", "../shared/data/warc"]
VARIANTS = {"local-1": ("local", 1), "local-2": ("local", 2), "ray-2": ("ray", 2)}


def input_bytes(paths: list[str]) -> int:
    from openafm.data.readers import input_files

    return sum(Path(p).stat().st_size for p in input_files(paths))


def run_variant(name: str, inputs: list[str]) -> dict:
    from openafm.data import curate

    executor, workers = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stats = curate(inputs, Path(tmp) / "out", executor=executor, workers=workers)
        wall = time.perf_counter() - start
        sig = json.loads(
            (Path(tmp) / "out" / "logs" / "fuzzy_signatures" / "stats.json").read_text()
        )
    minhash = sig[1]
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    seconds = minhash["time_stats"]["total"] if isinstance(minhash["time_stats"], dict) else 0.0
    return {
        "variant": name,
        "wall_s": wall,
        "documents_in": stats["documents_in"],
        "documents_kept": stats["documents_kept"],
        "stages": {
            r["stage"]: {
                "documents_per_s": r["in"] / r["seconds"] if r["seconds"] else None,
                "seconds": r["seconds"],
            }
            for r in stats["stages"]
        },
        "minhash_signatures_per_s": stats["stages"][-1]["in"] / seconds if seconds else None,
        "peak_rss_bytes": peak * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", default=DEFAULT_INPUTS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.input)))
        return
    size = input_bytes(args.input)
    results = {}
    for name in args.variants:
        cmd = [sys.executable, __file__, "--worker", name, "--input", *args.input]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        workers = VARIANTS[name][1]
        r["documents_per_s"] = r["documents_in"] / r["wall_s"]
        r["mb_per_s_per_core"] = size / 1e6 / r["wall_s"] / workers
        results[name] = r
    report = {"input_bytes": size, "inputs": args.input, "runs": results}
    if "local-1" in results and "local-2" in results:
        report["speedup_2_workers"] = results["local-1"]["wall_s"] / results["local-2"]["wall_s"]
    if "local-2" in results and "ray-2" in results:
        report["ray_vs_local_wall"] = results["ray-2"]["wall_s"] / results["local-2"]["wall_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
