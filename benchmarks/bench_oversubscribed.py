"""`afm train --nproc N` when processes outnumber cores, quiet and beside CPU-bound processes,
as JSON: wall time to the first step and to the end, median step time, and each run's tokens/s
as a ratio to one process on the quiet machine in the same invocation.

    python benchmarks/bench_oversubscribed.py [--steps 6] [--busy 1] [--out results.json]

Every layout trains afm-tiny at --seq-len 64 on the same text with the same global batch, so
their steps do the same work; four ranks on two cores should progress at about the rate of
one process on those cores, less what their collectives cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "fixtures" / "text" / "pride_and_prejudice_excerpt.txt"
LAYOUTS = [(1, ""), (2, "dp_shard=2"), (4, "dp_shard=2,tp=2")]
BUSY_LOOP = "while True: pass"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import cpu  # noqa: E402


def run_once(nproc: int, mesh: str, steps: int, work: Path) -> dict:
    """Train, watching metrics.jsonl for the first step; the layout's timings."""
    out = work / f"run-{nproc}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "openafm", "train", "--config", "afm-tiny", "--seq-len",
               "64", "--steps", str(steps), "--data", str(TEXT), "--out", str(out)]  # fmt: skip
    if nproc > 1:
        command += ["--nproc", str(nproc), "--mesh", mesh]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and (out / "metrics.jsonl").exists():
            first = time.perf_counter() - start
        time.sleep(0.05)
    total = time.perf_counter() - start
    if proc.returncode:
        err = proc.stderr.read().decode().strip().splitlines() if proc.stderr else []
        raise SystemExit(f"--nproc {nproc} failed: {err[-1:] or '(no output)'}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["step"] > 1] or records  # step 1 includes warm-up
    return {
        "nproc": nproc,
        "mesh": mesh or "(one process)",
        "first_step_s": round(first or total, 1),
        "total_s": round(total, 1),
        "step_s_median": round(statistics.median(r["step_time"] for r in later), 3),
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in later), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--busy", type=int, default=1, help="CPU-bound processes beside.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="oversubscribed-") as tmp:
        for beside in (0, args.busy):
            busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(beside)]
            try:
                for nproc, mesh in LAYOUTS:
                    rows.append(
                        {"busy_beside": beside, **run_once(nproc, mesh, args.steps, Path(tmp))}
                    )
            finally:
                for p in busy:
                    p.kill()
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_to_one_process_quiet"] = round(row["tokens_per_s"] / base, 3)
    report = {"benchmark": "oversubscribed", "machine": cpu(), "steps": args.steps, "runs": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
