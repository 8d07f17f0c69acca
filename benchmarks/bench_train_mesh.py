"""Training throughput of one model under each 2-process mesh, against one process, as JSON.

Every layout trains the same model on the same global batches (8 x 256 tokens per step by
default) for a few steps; the result is the median tokens/s of the steps after the first, and
each layout's ratio to the one-process run measured in the same invocation. On a CPU the
processes share the machine's cores, so this measures the cost of each plan's communication
(FSDP gathers, ring-attention exchanges, tensor-parallel collectives), not a speed-up.

    python benchmarks/bench_train_mesh.py [--config afm-tiny] [--steps 6] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "fixtures" / "text" / "pride_and_prejudice_excerpt.txt"
LAYOUTS = [(1, ""), (2, "dp_shard=2"), (2, "cp=2"), (2, "tp=2")]


def worker(config_name: str, steps: int, mesh: str, out: str) -> None:
    from openafm.runtime import load_tokenizer_for
    from openafm.train.config import load_train_config
    from openafm.train.mesh import MeshSpec
    from openafm.train.trainer import train

    config = load_train_config(config_name).replace(
        steps=steps, warmup_steps=1, eval_every=10_000, val_fraction=0.0
    )
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(
            config,
            [TEXT],
            tmp,
            mesh=MeshSpec.parse(mesh),
            tokenizer=load_tokenizer_for(None),
            on_step=records.append,
            save=False,
        )
    if int(os.environ.get("RANK", 0)) == 0:  # only rank 0 reports its steps
        speeds = [r["tokens_per_s"] for r in records[1:]]
        Path(out).write_text(
            json.dumps(
                {
                    "mesh": summary.mesh,
                    "tokens_per_s": statistics.median(speeds),
                    "mfu": statistics.median(r["mfu"] for r in records[1:]),
                    "loss_last": records[-1]["loss"],
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="afm-tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("MESH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.steps, *args.worker)
        return
    results = []
    for nproc, mesh in LAYOUTS:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--steps",
                str(args.steps),
            ]
            command += ["--worker", mesh, out.name]
            if nproc > 1:
                command = [
                    sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", *command[1:],
                ]  # fmt: skip
            subprocess.run(command, check=True)
            results.append({"nproc": nproc, **json.loads(Path(out.name).read_text())})
    base = results[0]["tokens_per_s"]
    for r in results:
        r["ratio_to_one_process"] = r["tokens_per_s"] / base
    report = {
        "benchmark": "train_mesh",
        "config": args.config,
        "steps": args.steps,
        "runs": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
