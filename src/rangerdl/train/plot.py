"""``rangerdl plot``: loss and metric curves of one or more runs, against step and wall time."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rangerdl.train.metrics import read_metrics

DEFAULT_TAGS = ("train/loss", "val/loss", "val/accuracy", "val/bits_per_byte")

_ID = re.compile(r"[0-9a-f]{8}(?:-?[0-9a-f]{4}){3}-?[0-9a-f]{12}|[0-9a-f]{16,}", re.IGNORECASE)


def short_run_names(run_dirs: list[Path]) -> list[str]:
    """Legend names: the folder name with long ids (torchrun's UUID run id, long hex strings) cut
    to their first 8 characters; with the parent folder when two names would be the same."""

    def short(p: Path) -> str:
        return _ID.sub(lambda m: m.group(0)[:8], p.name)

    names = [short(p) for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{short(p.parent)}/{short(p)}" for p in run_dirs]
    if len(set(names)) < len(names):
        names = [str(p) for p in run_dirs]
    return names


def plot_figure(run_dirs: list[Path], tags: list[str] | None = None) -> tuple[Any, list[str]]:
    """The figure (not saved) and the tags drawn: one row of panels per tag (those present of
    ``tags``, default ``DEFAULT_TAGS``), x = step (left) and wall time (right). Each run has one
    colour in every panel, and one legend above the panels names them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d: read_metrics(d) for d in run_dirs}
    present = {k for rows in runs.values() for row in rows for k in row}
    tags = [t for t in (tags or DEFAULT_TAGS) if t in present]
    if not tags:
        raise ValueError(f"none of the runs has metrics to plot (found keys: {sorted(present)})")
    fig, axes = plt.subplots(len(tags), 2, figsize=(11, 3.2 * len(tags) + 0.6), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    palette = [cmap(i) for i in range(cmap.N)]
    handles = []
    names = short_run_names(run_dirs)
    for n, (rows, name) in enumerate(zip(runs.values(), names, strict=True)):
        color = palette[n % len(palette)]
        times = _wall_times(rows)
        for i, tag in enumerate(tags):
            pts = [(r["step"], times[j], r[tag]) for j, r in enumerate(rows) if tag in r]
            if not pts:
                continue
            steps, secs, values = zip(*pts, strict=True)
            style: dict[str, Any] = {"color": color, "label": name}
            if tag.startswith(("val/", "test/")):
                style |= {"marker": "o", "markersize": 3}
            axes[i][0].plot(steps, values, **style)
            axes[i][1].plot(secs, values, **style)
        handles.append(matplotlib.lines.Line2D([], [], color=color, label=name))
    for i, tag in enumerate(tags):
        for j, xlabel in enumerate(("step", "training wall time (s)")):
            ax = axes[i][j]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(tag)
            ax.grid(alpha=0.3)
            if tag.endswith("loss"):
                ax.set_yscale("log")
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(handles), 4),
        fontsize=9,
        frameon=False,
    )
    rows_of_legend = -(-len(handles) // 4)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.35 * rows_of_legend + 0.1) / fig.get_figheight()))
    return fig, tags


def plot_runs(run_dirs: list[Path], out: Path, tags: list[str] | None = None) -> list[str]:
    """Save :func:`plot_figure` to ``out``; returns the tags drawn."""
    import matplotlib.pyplot as plt

    fig, drawn = plot_figure(run_dirs, tags)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def _wall_times(rows: list[dict[str, Any]]) -> list[float]:
    """Training seconds at each row (``time/train_s``; evaluation rows take the last one seen)."""
    out, last = [], 0.0
    for row in rows:
        last = row.get("time/train_s", last)
        out.append(last)
    return out
