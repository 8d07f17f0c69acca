"""The recovery adapter's learning curve: held-out KL divergence against distillation tokens.

Reads the run's `metrics.jsonl` (held-out KLD every few steps), measures the starting point
(the compressed model without any adapter, on the same held-out windows), and writes a PNG and
the points as JSON.

    python benchmarks/recovery_curve.py --model DIR --data F [--data F ...] --holdout 16 \
        --seq-len 256 --batch-size 4 --out docs/recovery_curve
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from openafm.adapters import detach
from openafm.adapters.trainer import evaluate
from openafm.compress.recovery import distillation_loss, token_windows
from openafm.runtime import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--holdout", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json/.png")
    args = parser.parse_args()

    run_dir = args.run_dir or args.model / ".recovery-run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    tokens_per_step = args.batch_size * args.seq_len
    points = [
        (m["step"] * tokens_per_step, m["eval_loss"]) for m in metrics if m["eval_loss"] is not None
    ]
    student = load_pretrained(args.model)
    meta = json.loads((args.model / "compression.json").read_text())
    teacher = load_pretrained(meta["made_with"]["base"])
    detach(student.model)
    windows, _ = token_windows(student.tokenizer, args.data, args.seq_len)
    held = windows[len(windows) - args.holdout :]
    start = evaluate(
        student.model, held, 0, batch_size=args.batch_size, loss_fn=distillation_loss(teacher.model)
    )
    points.insert(0, (0, start))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps([{"tokens": t, "held_out_kld": k} for t, k in points], indent=2) + "\n"
    )
    print(json.dumps(points))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t / 1e3 for t, _ in points], [k for _, k in points], marker="o")
    ax.set_xlabel("distillation tokens (thousands)")
    ax.set_ylabel("held-out mean KLD from the float base")
    ax.set_title(f"Recovery adapter on {args.model.name}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=130)


if __name__ == "__main__":
    main()
