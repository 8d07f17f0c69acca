"""`afm train plot`: loss and throughput curves of one run, or of several runs side by side."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from openafm.train.metrics import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_runs(run_dirs: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Draw training and held-out loss, tokens/s and MFU against tokens seen; returns the PNG.

    With one run the PNG goes to `RUN_DIR/curves.png` by default; with several, `out` is needed
    and each run is one colour (held-out loss as markers, training loss as a thin line).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("name at least one run directory")
    if out is None and len(run_dirs) > 1:
        raise ValueError("comparing several runs needs --out FILE.png")
    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    for name, records in runs.items():
        if not records:
            raise ValueError(f"{name}: the metrics file has no steps yet")
    out = Path(out) if out is not None else Path(run_dirs[0]) / "curves.png"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    mfu = bottom.twinx()
    for i, (name, records) in enumerate(runs.items()):
        colour = f"C{i}"
        prefix = f"{name}: " if len(runs) > 1 else ""
        tokens = [r["tokens"] for r in records]
        top.plot(tokens, [r["lm_loss"] for r in records], lw=0.6, color=colour, alpha=0.6,
                 label=f"{prefix}training next-token loss")  # fmt: skip
        if len(runs) == 1 and _distilled(Path(run_dirs[0])):
            top.plot(
                tokens, [r["loss"] for r in records], lw=0.6, color="C1", label="distillation loss"
            )
        evals = [r for r in records if "val_loss" in r]
        if evals:
            top.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-",
                     color=colour if len(runs) > 1 else "C2", label=f"{prefix}held-out loss")  # fmt: skip
        bottom.plot(tokens, [r["tokens_per_s"] for r in records], lw=0.8, color=colour,
                    label=name if len(runs) > 1 else None)  # fmt: skip
        mfu.plot(tokens, [100 * r["mfu"] for r in records], lw=0.4, color=colour, alpha=0.4)
    top.set_ylabel("loss (nats/token)")
    title = ", ".join(f"{n} ({r[-1]['tokens']:,} tokens)" for n, r in runs.items())
    top.set_title(textwrap.fill(title, 80))  # several long run names wrap instead of overflowing
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    bottom.set_ylabel("tokens/s")
    bottom.set_xlabel("tokens seen")
    bottom.grid(alpha=0.3)
    if len(runs) > 1:
        bottom.legend(fontsize="small")
    mfu.set_ylabel("MFU (%, faint)")
    return save_figure(fig, out, dpi=110)


def save_figure(fig: Figure, out: Path, *, dpi: int = 100) -> Path:
    """Lay out, write to a temporary name and rename into place (no half-written PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out.with_name(out.name + ".partial.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(out)
    return out


def _distilled(run_dir: Path) -> bool:
    config = run_dir / "train_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("teacher"))
