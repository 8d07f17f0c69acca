"""Curves of RL runs: reward, KL to the reference and to the rollout policy, answer length and
the empty-answer rate per iteration; several runs (e.g. MDLOO against RLOO) side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from openafm.train.metrics import read_metrics
from openafm.train.plot import save_figure

PANELS = (
    ("reward", "mean reward"),
    ("kl_to_reference", "KL to reference\n(nats/answer)"),
    ("kl_to_old", "KL to rollout\npolicy"),
    ("length", "length (tokens)"),
    ("empty_rate", "empty answers"),
)


def is_rl_run(run_dir: Path | str) -> bool:
    """Whether a run directory's metrics are an RL run's."""
    records = read_metrics(run_dir)
    return bool(records) and "kl_to_reference" in records[0]


def plot_rl_runs(run_dirs: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Draw every panel against the iteration; returns the PNG (one run: RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if out is None and len(run_dirs) > 1:
        raise ValueError("comparing several runs needs --out FILE.png")
    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    out = Path(out) if out is not None else Path(run_dirs[0]) / "curves.png"
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.2 * len(PANELS)), sharex=True)
    for i, (name, records) in enumerate(runs.items()):
        if not records:
            raise ValueError(f"{name}: the metrics file has no iterations yet")
        x = [r["iteration"] for r in records]
        for axis, (key, _) in zip(axes, PANELS, strict=True):
            axis.plot(x, [r[key] for r in records], "-o", ms=2, lw=1, color=f"C{i}", label=name)
    for axis, (_, label) in zip(axes, PANELS, strict=True):
        axis.set_ylabel(label, fontsize="small")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("iteration (one rollout batch)")
    return save_figure(fig, out)
