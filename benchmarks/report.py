"""Markdown tables from ``benchmarks/results/*.json``, and ``results/EVIDENCE.md`` made of them.

Every table is generated from a results file and preceded by the exact command that produced it,
so the README can include ``EVIDENCE.md`` verbatim. Nothing here measures anything::

    python benchmarks/report.py [--results benchmarks/results] [--out .../EVIDENCE.md]

The time-to-quality and convergence scripts import their table functions from here, so what they
print and what EVIDENCE.md shows are the same text.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _num(value: float | None, fmt: str = ".3f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, fmt)


def _pct(value: float | None, none: str = "-") -> str:
    return none if value is None else f"{100 * value:.0f}%"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _rate(rate: str | None) -> str:
    if rate is None:
        return "no limit"
    return rate.replace("mbit", " Mbit/s").replace("gbit", " Gbit/s")


# ------------------------------------------------------------------------- time to quality
TTQ_HEADER = (
    "| contender | final val loss | vs target | time to target (s) | time to target +2% (s) "
    "| / DDP time | speedup at own final | train time (s) | MB sent per rank | bytes / DDP's "
    "| wire MB per host | comm share | others' CPU |\n" + "|---" * 13 + "|"
)


def _ttq_row(row: dict[str, Any], label: str | None = None) -> str:
    name = label or row["contender"]
    if not row.get("ok"):
        return f"| {name} | failed: {row.get('error', '?')[:80]} |" + " |" * 11
    reduction = row.get("bytes_reduction_vs_ddp")
    cells = [
        name,
        _num(row["final_val_loss"], ".4f"),
        _num(100 * row["final_vs_target"], "+.1f") + "%" if "final_vs_target" in row else "-",
        _num(row.get("time_to_target_s"), ".1f", "not reached"),
        _num(row.get("time_to_target_2pct_s"), ".1f", "not reached"),
        _num(row.get("time_to_target_2pct_vs_ddp"), ".2f") + "x"
        if row.get("time_to_target_2pct_vs_ddp") is not None
        else "-",
        _num(row.get("speedup_at_final"), ".2f") + "x"
        if row.get("speedup_at_final") is not None
        else "-",
        _num(row["train_time_s"], ".1f"),
        _mb(row.get("bytes_per_rank")),
        f"1/{reduction:.1f}" if reduction else "-",
        _mb(row.get("wire_tx_bytes_per_host")),
        _pct(row.get("comm_share")),
        _pct(row.get("others_cpu_share")),
    ]
    return "| " + " | ".join(cells) + " |"


def ttq_tables(payload: dict[str, Any]) -> str:
    """One table per cell, then the repeats (timing noise) and the headline check."""
    out = []
    for cell in payload["cells"]:
        target = cell.get("target_val_loss")
        title = (
            f"**{cell['workload']}, {cell['hosts']} hosts, {_rate(cell['rate'])}** "
            f"({cell['launcher']}); target = DDP AdamW's final val loss = {_num(target, '.4f')}"
        )
        lines = [title, "", TTQ_HEADER]
        lines += [
            _ttq_row(r, r["contender"] + " (repeat)" if r.get("repeat") else None)
            for r in cell["rows"]
        ]
        ref = cell.get("single_reference")
        if ref:
            lines.append(_ttq_row(ref, "single_ranger (1 process, reference)"))
        if cell.get("repeats"):
            spread = "; ".join(
                f"{rep['contender']} {' vs '.join(_num(t, '.1f') for t in rep['train_time_s'])} s"
                for rep in cell["repeats"]
            )
            lines.append(f"\nTiming noise, the same run twice (first, repeat): {spread}.")
        out.append("\n".join(lines))
    head = payload.get("headline", {})
    if head.get("evaluated"):
        lines = [
            f"**Target** ({head['cell']}): {head['criterion']}. "
            f"Met by: {', '.join(head['met_by']) or 'none'}.",
            "",
            "| contender | reached +2% | time / DDP's (<= 0.33) | bytes / DDP's (<= 1/k) "
            "| final val vs target |",
            "|---|---|---|---|---|",
        ]
        for c in head["checks"]:
            red = c["bytes_reduction"]
            lines.append(
                f"| {c['contender']} | {'yes' if c['reached_within_2pct'] else 'no'} "
                f"| {_num(c['time_ratio_vs_ddp'], '.2f')} {'ok' if c['time_ok'] else 'missed'} "
                f"| 1/{_num(red, '.1f')} (k={c['k']}) {'ok' if c['bytes_ok'] else 'missed'} "
                f"| {_num(100 * c['final_vs_target'] if c['final_vs_target'] is not None else None, '+.1f')}% |"
            )
        out.append("\n".join(lines))
    definitions = payload.get("definitions", {}).get("text")
    if definitions:
        out.append("How the columns are measured (from the script's docstring):\n\n" + definitions)
    return "\n\n".join(out)


# ------------------------------------------------------------------------- convergence
def _spread(s: dict[str, float | None]) -> str:
    if s["mean"] is None:
        return "diverged"
    std = f" +- {s['std']:.3f}" if s["std"] is not None else ""
    return f"{s['mean']:.3f}{std}"


def convergence_table(payload: dict[str, Any], task: str) -> str:
    """One row per optimizer: final loss (mean +- sd over seeds) at each lr; best lr in bold."""
    rows = [r for r in payload["rows"] if r["task"] == task]
    factors = payload["lr_factors"]
    head = " | ".join(f"lr {_factor(f)}" for f in factors)
    lines = [
        f"| optimizer | {head} | best lr: loss (min..max) | best lr: accuracy |",
        "|---|" + "---|" * (len(factors) + 2),
    ]
    for opt, info in payload["optimizers"].items():
        mine = sorted((r for r in rows if r["optimizer"] == opt), key=lambda r: r["lr"])
        if not mine:
            continue
        cells = []
        for f in factors:
            lr = info["default_lr"] * f
            match = [r for r in mine if math.isclose(r["lr"], lr, rel_tol=1e-9)]
            if not match:
                cells.append("-")
                continue
            r = match[0]
            note = f" ({len(r['diverged_seeds'])} diverged)" if r["diverged_seeds"] else ""
            bold = "**" if r.get("is_best_lr") else ""
            cells.append(f"{bold}{_spread(r['final_loss'])}{bold}{note} @ {r['lr']:.3g}")
        best = next((r for r in mine if r.get("is_best_lr")), None)
        if best is None:
            best_txt, acc = "all diverged", "-"
        else:
            fl = best["final_loss"]
            best_txt = f"{fl['mean']:.3f} ({fl['min']:.3f}..{fl['max']:.3f}) @ {best['lr']:.3g}"
            acc = _spread(best["final_accuracy"])
        lines.append(f"| {opt} | {' | '.join(cells)} | {best_txt} | {acc} |")
    return "\n".join(lines)


def _factor(f: float) -> str:
    if math.isclose(f, 1.0):
        return "default"
    return f"{f:g}x" if f >= 1 else f"1/{1 / f:g}x"


def convergence_tables(payload: dict[str, Any]) -> str:
    out = []
    for task, info in payload["tasks"].items():
        out.append(
            f"**{task}**: {info['what']}; {info['steps']} steps; final loss, mean +- sd over "
            f"seeds {payload['seeds']}\n\n{convergence_table(payload, task)}"
        )
    return "\n\n".join(out)


# ------------------------------------------------------------------------- others
def optimizer_step_table(payload: dict[str, Any]) -> str:
    lines = [
        f"{payload['num_tensors']} tensors, {payload['num_values'] / 1e6:.1f}M values, "
        f"{payload['threads']} threads, {payload['device']}, torch {payload['torch']}",
        "",
        "| optimizer | median step (ms) | vs fused AdamW |",
        "|---|---|---|",
    ]
    for r in payload["rows"]:
        lines.append(
            f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['ratio_to_fused_adamw']:.2f}x |"
        )
    return "\n".join(lines)


def data_loader_tables(payload: dict[str, Any]) -> str:
    """The data loader benchmark's own table printer (its schema is its own)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import data_loader

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        data_loader.print_tables(payload)
    text = buf.getvalue().strip().splitlines()
    if text and text[0].startswith("`"):
        text = text[1:]  # the command line: printed above the tables already
    return "\n".join(text).strip()


def ttq_protocol_tables(payload: dict[str, Any]) -> str:
    from ttq_protocol import tables

    return tables(payload)


SECTIONS = (
    ("Time to DDP's quality (the protocol)", "ttq_protocol.json", ttq_protocol_tables),
    ("Time to quality at equal steps (400)", "time_to_quality.json", ttq_tables),
    ("Convergence, single process", "convergence.json", convergence_tables),
    ("Optimizer step time", "optimizer_step.json", optimizer_step_table),
    ("Data loader memory and speed", "data_loader.json", data_loader_tables),
)


def evidence(results: Path, timings: dict[str, str] | None = None) -> str:
    """EVIDENCE.md: per results file, its command, its tables and its plots."""
    parts = [
        "# Evidence",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; "
        "`make bench` (`benchmarks/run_all.sh`) reruns everything. Each table follows the "
        "command that produced it.",
    ]
    if timings:
        spent = ", ".join(f"{k} {v} s" for k, v in timings.items())
        parts += ["", f"Wall time of the last `make bench` on this machine: {spent}."]
    for title, name, render in SECTIONS:
        path = results / name
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        parts += ["", f"## {title}", "", "```", payload["command"], "```", ""]
        if payload.get("quick"):
            parts += ["(quick mode: smoke-test sizes, the numbers mean nothing)", ""]
        parts.append(render(payload))
        for png in sorted(results.glob(f"{path.stem}*.png")):
            parts += ["", f"![{png.stem}]({png.name})"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, help="default: RESULTS/EVIDENCE.md")
    parser.add_argument(
        "--timings", nargs="*", default=[], metavar="NAME=SECONDS", help="from run_all.sh"
    )
    args = parser.parse_args(argv)
    out = args.out or args.results / "EVIDENCE.md"
    timings = dict(t.split("=", 1) for t in args.timings)
    text = evidence(args.results, timings)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
