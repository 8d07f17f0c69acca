"""Train the default palettized model's recovery adapter within a time budget, on a GPU if any.

This is how the shipped adapter was made on a lent GPU machine (see docs/compression.md). It
uses the library, not the `afm` command line, so that it needs nothing beyond PyTorch and the
packages such a machine already has (plus `gguf`). It rebuilds `smollm2-135m-palettized` from
its recipe, measures the step rate, trains a rank-16 adapter for `--budget-s` seconds and,
with `--compare-s`, ranks 8, 16 and 32 for that many seconds each; adapters, metrics and a
summary go to `--out`.

    python scripts/recover_on_device.py --data DIR --out DIR [--budget-s 270] [--compare-s 45]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from openafm.adapters import save_adapter
from openafm.adapters.trainer import TrainConfig
from openafm.compress.default_model import PALETTIZED_DEFAULT, ensure_built
from openafm.compress.recovery import RecoveryConfig, run_recovery
from openafm.runtime import load_pretrained

DATA_FILES = (
    "sft/alpaca_eval_gpt4_outputs.json",
    "sft/alpaca_eval_text_davinci_003_outputs.json",
    "news-summ-frank/frank_articles_with_summaries.jsonl",
    "aeslc/aeslc_dev.jsonl",
    "dialogsum/dialogsum.dev.jsonl",
    "text-corpus/wikitext-2.valid.tokens.txt",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train(args, models, rank: int, steps: int, run_dir: Path, device: torch.device):
    """A fresh recovery adapter of `rank` for `steps` steps (the models are reused across runs)."""
    student, teacher, signature = models
    config = TrainConfig(
        steps=steps,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_every=max(1, steps // 10),
        warmup_steps=min(20, max(1, steps // 10)),
        checkpoint_every=max(10, steps // 5),
    )
    adapter, result = run_recovery(
        student.model,
        teacher.model,
        student.tokenizer,
        [args.data / f for f in DATA_FILES],
        run_dir,
        RecoveryConfig(rank=rank, alpha=2.0 * rank, seq_len=args.seq_len),
        config,
        holdout=16,
        provenance={"teacher": student_base(), "command": " ".join(sys.argv)},
        device=device,
    )
    adapter.metadata["base_signature"] = signature
    return adapter, result


def student_base() -> str:
    recipe = Path(__file__).resolve().parents[1] / "models/compressed" / PALETTIZED_DEFAULT
    return json.loads((recipe / "recipe.json").read_text())["base"]


def _load_base(name: str):
    pretrained = load_pretrained(name)
    return pretrained.model, pretrained.tokenizer, pretrained.signature()


def step_rate(run_dir: Path) -> float:
    """Median tokens/s of a run's steps after the first two (warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[2:] or rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Folder laid out as shared/data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=270.0)
    parser.add_argument("--compare-s", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/recover-on-device"), help="run directories"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"device {device}; building {PALETTIZED_DEFAULT} from its recipe")
    student = load_pretrained(ensure_built(PALETTIZED_DEFAULT, _load_base))
    models = (student, load_pretrained(student_base()), student.signature())
    log("probe: 8 steps")
    train(args, models, 16, 8, work / "probe", device)
    rate = step_rate(work / "probe")
    tokens_per_step = args.batch_size * args.seq_len
    summary: dict[str, object] = {"device": str(device), "tokens_per_s": round(rate)}
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name()
    runs = [(16, args.budget_s, "main")]
    if args.compare_s:
        runs += [(rank, args.compare_s, f"compare-r{rank}") for rank in (8, 16, 32)]
    for rank, seconds, label in runs:
        steps = max(10, int(seconds * rate / tokens_per_step))
        log(f"{label}: rank {rank}, {steps} steps ({steps * tokens_per_step:,} tokens)")
        adapter, result = train(args, models, rank, steps, work / label, device)
        summary[label] = {
            "rank": rank,
            "steps": steps,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 1),
            "final_kld": round(result.final_loss, 5),
            "held_out_kld": result.eval_loss and round(result.eval_loss, 5),
        }
        log(f"{label}: {summary[label]}")
        shutil.copy(work / label / "metrics.jsonl", args.out / f"{label}-metrics.jsonl")
        if label == "main":
            save_adapter(adapter.to(torch.bfloat16), args.out / "recovery")
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log("done")


if __name__ == "__main__":
    main()
