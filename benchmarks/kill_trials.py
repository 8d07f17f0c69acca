"""Kill -9 trials: SIGKILL a long-running command at a random time, rerun the same command,
and compare the result with an uninterrupted run, as JSON (trials, identical, differences).

    python benchmarks/kill_trials.py [--trials 20] [--only train,adapter] [--out results.json]

Targets, each on the tiny model so that a trial takes seconds: `afm train` in one process and
in two (`--nproc 2`), `afm adapter train`, `afm recover` and `afm data curate`. A trial kills
the whole process group at a time drawn uniformly from 10-95% of the uninterrupted run's wall
time, notes how far the run got (steps logged; pipeline tasks completed for curation), reruns
the command to the end, then compares per-step losses (relative 1e-5) and output
files (sha256 of the content, gzip undone; weights that differ are reported with their largest
absolute difference; for curation, the kept and removed documents).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_decode import cpu  # noqa: E402

TEXT = ROOT / "tests" / "fixtures" / "text" / "pride_and_prejudice_excerpt.txt"
WARCS = [ROOT / "tests" / "fixtures" / "warc" / f"sample-000{i}.warc.gz" for i in (0, 1)]


@dataclass(frozen=True)
class Target:
    """A command to kill: how to run it into `out`, and what of `out` must match."""

    name: str
    command: Callable[[Path], list[str]]
    prepare: Callable[[Path], None]
    losses: Callable[[Path], dict[int, float]]
    files: Callable[[Path], list[Path]]
    env: dict[str, str]

    def progress(self, out: Path) -> int:
        """How far a run got: steps logged, or pipeline tasks completed for curation."""
        return len(self.losses(out)) or sum(1 for _ in out.glob("c/logs/*/completions/*"))


def _metrics(path: Path) -> dict[int, float]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def _sha(path: Path) -> str:
    """Of the content: a gzip member's header holds a time, which is not the result."""
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if path.suffix == ".gz" else data).hexdigest()


def _weights_gap(a: Path, b: Path) -> float | None:
    if a.suffix != ".safetensors":
        return None
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def build_inputs(work: Path) -> dict[str, Path]:
    """The tiny model (HF directory), its compressed copy, the training files."""
    from tests.conftest import byte_tokenizer, make_tiny

    from openafm.compress.pipeline import DEFAULT_CALIBRATION
    from openafm.io import write_hf

    tiny = work / "tiny"
    model = make_tiny()
    write_hf(tiny, model.config, model.state_dict())
    byte_tokenizer().save(tiny)
    compressed = work / "tiny-3.5"
    _afm("compress", "--model", str(tiny), "--out", str(compressed), "--bpw", "3.5",
         "--bits", "2,4", "--calibration-tokens", "1024")  # fmt: skip
    config = work / "tiny-fp32.json"
    config.write_text(
        json.dumps({"preset": "tiny", "precision": "fp32", "steps": 200, "checkpoint_every": 5})
    )
    chats = work / "chats.jsonl"
    pairs = [("colour of the sky?", "blue"), ("two plus two?", "four"), ("capital?", "Paris")]
    chats.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": a}]}) + "\n"
            for _ in range(20) for q, a in pairs
        )
    )  # fmt: skip
    return {"tiny": tiny, "compressed": compressed, "config": config, "chats": chats,
            "calibration": Path(DEFAULT_CALIBRATION)}  # fmt: skip


def _afm(*args: str) -> None:
    run = subprocess.run([sys.executable, "-m", "openafm", *args], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"afm {args[0]} failed: {run.stderr.strip().splitlines()[-1:]}")


def targets(inputs: dict[str, Path]) -> list[Target]:
    one_thread = {"OMP_NUM_THREADS": "1"}
    train = ["train", "--config", str(inputs["config"]), "--data", str(TEXT),
             "--tokenizer", str(inputs["tiny"]), "--resume"]  # fmt: skip
    adapter = ["adapter", "train", "--model", str(inputs["tiny"]), "--data", str(inputs["chats"]),
               "--name", "kill", "--rank", "4", "--steps", "200", "--batch-size", "2",
               "--lr", "1e-3"]  # fmt: skip
    recover = ["recover", "--data", str(inputs["calibration"]), "--steps", "100", "--rank", "4",
               "--seq-len", "64", "--lr", "3e-3", "--holdout", "4", "--eval-every", "20"]  # fmt: skip

    def copy_compressed(out: Path) -> None:
        shutil.copytree(inputs["compressed"], out / "model")

    def nothing(out: Path) -> None:
        out.mkdir(parents=True)

    return [
        Target("train (1 process)", lambda o: [*train, "--out", str(o)], nothing,
               lambda o: _metrics(o / "metrics.jsonl"), lambda o: [o / "model.safetensors"],
               one_thread),
        Target("train (2 processes, dp_shard=2)",
               lambda o: [*train, "--out", str(o), "--nproc", "2", "--mesh", "dp_shard=2"],
               nothing, lambda o: _metrics(o / "metrics.jsonl"),
               lambda o: [o / "model.safetensors"], one_thread),
        Target("adapter train", lambda o: [*adapter, "--out", str(o / "out"),
                                           "--run-dir", str(o / "run")],
               nothing, lambda o: _metrics(o / "run" / "metrics.jsonl"),
               lambda o: [o / "out" / "adapter.safetensors"], one_thread),
        Target("recover", lambda o: [*recover, "--model", str(o / "model"),
                                     "--run-dir", str(o / "run")],
               copy_compressed, lambda o: _metrics(o / "run" / "metrics.jsonl"),
               lambda o: [o / "model" / "recovery" / "adapter.safetensors"], one_thread),
        Target("data curate", lambda o: ["data", "curate", "--workers", "1", "--out", str(o / "c"),
                                         *(x for w in WARCS for x in ("--input", str(w)))],
               nothing, lambda o: {},
               lambda o: sorted(p for d in ("kept", "removed") for p in (o / "c" / d).rglob("*")
                                if p.is_file()), one_thread),
    ]  # fmt: skip


def _run(target: Target, out: Path, kill_after: float | None) -> tuple[str, float]:
    """Run into `out`; with `kill_after`, SIGKILL the process group then. ("ok"|"killed"|error)"""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "openafm", *target.command(out)],
        env={**os.environ, **target.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed", time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    seconds = time.perf_counter() - start
    if proc.returncode:
        return "error: " + (err.strip().splitlines() or ["(no output)"])[-1][:200], seconds
    return "ok", seconds


def _compare(target: Target, reference: Path, got: Path) -> list[str]:
    diffs = []
    ref_losses, losses = target.losses(reference), target.losses(got)
    if sorted(ref_losses) != sorted(losses):
        diffs.append(f"steps {len(losses)} vs {len(ref_losses)}")
    else:
        worst = max((abs(losses[s] - v) / max(abs(v), 1e-12) for s, v in ref_losses.items()),
                    default=0.0)  # fmt: skip
        if worst > 1e-5:
            diffs.append(f"loss differs by {worst:.2e} (relative)")
    ref_files = {p.relative_to(reference): p for p in target.files(reference)}
    files = {p.relative_to(got): p for p in target.files(got)}
    if ref_files.keys() != files.keys():
        diffs.append(f"files differ: {sorted(map(str, ref_files.keys() ^ files.keys()))[:4]}")
    for name in sorted(ref_files.keys() & files.keys()):
        if _sha(ref_files[name]) != _sha(files[name]):
            gap = _weights_gap(ref_files[name], files[name])
            diffs.append(f"{name} not byte-identical" + (f" (max |diff| {gap:.1e})" if gap else ""))
    return diffs


def trial_table(target: Target, work: Path, trials: int, rng: random.Random) -> dict:
    reference = work / "reference"
    target.prepare(reference)
    status, seconds = _run(target, reference, None)
    if status != "ok":
        raise SystemExit(f"{target.name}: the uninterrupted run failed: {status}")
    row = {"target": target.name, "uninterrupted_s": round(seconds, 1), "trials": 0,
           "identical": 0, "ended_before_kill": 0, "rerun_errors": [], "differences": [],
           "progress_at_kill": []}  # fmt: skip
    while row["trials"] < trials:
        out = work / f"trial-{row['trials'] + row['ended_before_kill']}"
        target.prepare(out)
        status, _ = _run(target, out, rng.uniform(0.1, 0.95) * seconds)
        if status != "killed":
            row["ended_before_kill"] += 1
            shutil.rmtree(out)
            continue
        row["trials"] += 1
        row["progress_at_kill"].append(target.progress(out))
        status, _ = _run(target, out, None)
        if status != "ok":
            row["rerun_errors"].append(status)
        else:
            diffs = _compare(target, reference, out)
            row["identical"] += not diffs
            row["differences"].extend(diffs)
        shutil.rmtree(out)
        print(f"{target.name}: {row['trials']}/{trials}", file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="Kills per target.")
    parser.add_argument("--only", default="", help="Comma-separated words a target name holds.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill times.")
    parser.add_argument("--out", type=Path, help="Also write the JSON here.")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill-trials-") as tmp:
        work = Path(tmp)
        chosen = [
            t
            for t in targets(build_inputs(work))
            if not args.only or any(w.strip() in t.name for w in args.only.split(","))
        ]
        rows = []
        for i, target in enumerate(chosen):
            rows.append(trial_table(target, work / f"target-{i}", args.trials, rng))
    report = {"machine": cpu(), "seed": args.seed, "targets": rows}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
