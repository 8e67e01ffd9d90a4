"""``rangerdl plot``: one colour per run in every panel, one readable legend, short names."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.colors import to_hex

from rangerdl.train.plot import plot_figure, plot_runs, short_run_names

UUID_NAME = "gpt-3f2b9c4e-8d1a-4b6e-9f0c-2a7d5e1b8c93"


def fake_run(path: Path, rows: list[dict[str, float]]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_run_has_one_colour_in_every_panel(tmp_path: Path) -> None:
    # Only run b has val/accuracy: drawn alone in its panel, it must keep b's colour.
    a = fake_run(
        tmp_path / "a",
        [{"step": s, "train/loss": 2.0 / s, "time/train_s": 0.1 * s} for s in range(1, 5)]
        + [{"step": 4, "val/loss": 0.6}],
    )
    b = fake_run(
        tmp_path / UUID_NAME,
        [{"step": s, "train/loss": 3.0 / s, "time/train_s": 0.2 * s} for s in range(1, 5)]
        + [{"step": 4, "val/loss": 0.7, "val/accuracy": 0.8}],
    )
    fig, tags = plot_figure([a, b])
    assert tags == ["train/loss", "val/loss", "val/accuracy"]
    colours: dict[str, set[str]] = {}
    panels: dict[str, int] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(str(line.get_label()), set()).add(to_hex(line.get_color()))
            panels[str(line.get_label())] = panels.get(str(line.get_label()), 0) + 1
    assert set(colours) == {"a", "gpt-3f2b9c4e"}
    assert all(len(c) == 1 for c in colours.values())  # one colour per run, every panel
    assert colours["a"] != colours["gpt-3f2b9c4e"]
    assert panels == {"a": 4, "gpt-3f2b9c4e": 6}
    (legend,) = fig.legends  # one legend for the figure, naming every run
    assert [t.get_text() for t in legend.get_texts()] == ["a", "gpt-3f2b9c4e"]
    assert not any(ax.get_legend() for ax in fig.axes)
    plt.close(fig)
    out = tmp_path / "plot.png"
    assert plot_runs([a, b], out) == tags and out.stat().st_size > 0


def test_short_run_names() -> None:
    assert short_run_names([Path("runs") / UUID_NAME, Path("runs/cnn-20261127-050419")]) == [
        "gpt-3f2b9c4e",
        "cnn-20261127-050419",
    ]
    assert short_run_names([Path("x/a/t"), Path("x/b/t")]) == ["a/t", "b/t"]
    assert short_run_names([Path("x/a/t"), Path("y/a/t")]) == ["x/a/t", "y/a/t"]
