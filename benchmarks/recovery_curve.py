"""The recovery adapter's learning curve: held-out KL divergence against distillation tokens.

Reads a run's `metrics.jsonl` (held-out KLD every few steps), measures the starting point (the
compressed model without any adapter, on the same held-out windows), and adds the series under
`--label` to `OUT.json` (other labels there are kept), then plots every series in `OUT.png`.

    python benchmarks/recovery_curve.py --model DIR --data F [--data F ...] --holdout 16 \
        --seq-len 256 --batch-size 4 --metrics RUN/metrics.jsonl --label "CPU, batch 4" \
        --out docs/recovery_curve
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from openafm.adapters import detach
from openafm.adapters.trainer import evaluate
from openafm.compress.recovery import distillation_loss, token_windows
from openafm.runtime import load_pretrained


def starting_kld(model: Path, data: list[Path], holdout: int, seq_len: int) -> float:
    """Held-out KLD of the compressed model with no adapter."""
    student = load_pretrained(model)
    meta = json.loads((model / "compression.json").read_text())
    teacher = load_pretrained(meta["made_with"]["base"])
    detach(student.model)
    windows, _ = token_windows(student.tokenizer, data, seq_len)
    held = windows[len(windows) - holdout :]
    return evaluate(student.model, held, 0, batch_size=4, loss_fn=distillation_loss(teacher.model))


def plot(series: dict[str, list[dict[str, float]]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        shown = [p for p in points if p["tokens"] > 0]
        ax.plot([p["tokens"] for p in shown], [p["held_out_kld"] for p in shown], "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("held-out mean KLD from the float base")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--holdout", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="of the run (tokens per step)")
    parser.add_argument("--metrics", type=Path, help="[default: MODEL/.recovery-run/metrics.jsonl]")
    parser.add_argument("--label", default=None, help="series name [default: the model's name]")
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json/.png")
    args = parser.parse_args()

    metrics_path = args.metrics or args.model / ".recovery-run" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.open()]
    tokens_per_step = args.batch_size * args.seq_len
    points = [
        {
            "tokens": 0,
            "held_out_kld": starting_kld(args.model, args.data, args.holdout, args.seq_len),
        }
    ]
    points += [
        {"tokens": m["step"] * tokens_per_step, "held_out_kld": m["eval_loss"]}
        for m in metrics
        if m["eval_loss"] is not None
    ]
    json_path = args.out.with_suffix(".json")
    series = json.loads(json_path.read_text()) if json_path.is_file() else {}
    series[args.label or args.model.name] = points
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(series, indent=2) + "\n")
    print(json.dumps(points))
    plot(
        series,
        "Recovery adapter: held-out KLD against distillation tokens",
        args.out.with_suffix(".png"),
    )


if __name__ == "__main__":
    main()
