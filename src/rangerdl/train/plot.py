"""``rangerdl plot``: loss and metric curves of one or more runs, against step and wall time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rangerdl.train.metrics import read_metrics


def plot_runs(run_dirs: list[Path], out: Path, tags: list[str] | None = None) -> list[str]:
    """One row of panels per tag (``train/loss``, ``val/loss``, ``val/accuracy`` by default, those
    present), x = step (left) and wall time (right), one line per run. Returns the tags drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d: read_metrics(d) for d in run_dirs}
    present = {k for rows in runs.values() for row in rows for k in row}
    tags = [
        t
        for t in (tags or ["train/loss", "val/loss", "val/accuracy", "val/bits_per_byte"])
        if t in present
    ]
    if not tags:
        raise ValueError(f"none of the runs has metrics to plot (found keys: {sorted(present)})")
    fig, axes = plt.subplots(len(tags), 2, figsize=(11, 3.2 * len(tags)), squeeze=False)
    for run_dir, rows in runs.items():
        times = _wall_times(rows)
        for i, tag in enumerate(tags):
            pts = [(r["step"], times[j], r[tag]) for j, r in enumerate(rows) if tag in r]
            if not pts:
                continue
            steps, secs, values = zip(*pts, strict=True)
            style: dict[str, Any] = (
                {"marker": "o", "markersize": 3} if tag.startswith(("val/", "test/")) else {}
            )
            axes[i][0].plot(steps, values, label=run_dir.name, **style)
            axes[i][1].plot(secs, values, label=run_dir.name, **style)
    for i, tag in enumerate(tags):
        for j, xlabel in enumerate(("step", "training wall time (s)")):
            ax = axes[i][j]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(tag)
            ax.grid(alpha=0.3)
            if tag.endswith("loss"):
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return tags


def _wall_times(rows: list[dict[str, Any]]) -> list[float]:
    """Training seconds at each row (``time/train_s``; evaluation rows take the last one seen)."""
    out, last = [], 0.0
    for row in rows:
        last = row.get("time/train_s", last)
        out.append(last)
    return out
