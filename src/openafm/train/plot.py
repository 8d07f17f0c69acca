"""`afm train plot`: loss and throughput curves of a run, as a PNG."""

from __future__ import annotations

from pathlib import Path

from openafm.train.metrics import read_metrics


def plot_run(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Draw training/held-out loss and tokens/s against the step; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: the metrics file has no steps yet")
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    steps = [r["step"] for r in records]
    evals = [r for r in records if "val_loss" in r]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(steps, [r["loss"] for r in records], lw=0.8, label="training objective")
    if any("lm_loss" in r and r["lm_loss"] != r["loss"] for r in records):
        top.plot(steps, [r["lm_loss"] for r in records], lw=0.8, label="training next-token loss")
    if evals:
        top.plot(
            [r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out loss"
        )
    top.set_ylabel("loss (nats/token)")
    top.set_title(f"{Path(run_dir).name}: {records[-1]['tokens']:,} tokens")
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(steps, [r["tokens_per_s"] for r in records], lw=0.8, color="tab:green")
    bottom.set_ylabel("tokens/s")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    mfu = bottom.twinx()
    mfu.plot(steps, [100 * r["mfu"] for r in records], lw=0.5, color="tab:gray", alpha=0.6)
    mfu.set_ylabel("MFU (%)")
    fig.tight_layout()
    tmp = out.with_name(out.name + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out
