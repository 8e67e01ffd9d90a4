"""Markdown tables from ``benchmarks/results/*.json``, and the table blocks of README.md and docs/.

Every table is generated from a results file (each holds the exact command that made it); nothing
here measures anything. A block in README.md or ``docs/*.md``::

    <!-- table: NAME -->
    ...
    <!-- /table -->

holds ``tables()[NAME]``::

    python benchmarks/report.py            # print every table, by name
    python benchmarks/report.py --docs     # rewrite every block in README.md and docs/*.md
    python benchmarks/report.py --check    # exit 1, naming file and table, if a block differs

The convergence script prints its tables with the function here, so what it prints and what the
docs show are the same text.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))


def _num(value: float | None, fmt: str = ".3f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, fmt)


def _rate(rate: str | None) -> str:
    if rate is None:
        return "no limit"
    return rate.replace("mbit", " Mbit/s").replace("gbit", " Gbit/s")


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
    """Per optimizer and case (size x threads): the median ratio of its step time to fused
    AdamW's over the repeats, with min-max, and the bytes-moved floor of that ratio."""
    cases = payload["results"]
    heads = [f"{c['size']}, {c['threads']} thread{'s' if c['threads'] > 1 else ''}" for c in cases]
    lines = [
        f"Step time / torch's fused AdamW step time, median (min-max) of {payload['repeats']} "
        f"repeats of {payload['steps_per_repeat']} steps, {payload['device']}, torch "
        f"{payload['torch']}; fused AdamW's step: "
        + ", ".join(
            f"{h} {c['rows'][0]['median_ms']:.2f} ms" for h, c in zip(heads, cases, strict=True)
        ),
        "",
        "| optimizer | " + " | ".join(heads) + " | floor |",
        "|---" * (len(heads) + 2) + "|",
    ]
    for i, row in enumerate(cases[0]["rows"]):
        cells = []
        for c in cases:
            r = c["rows"][i]
            assert r["optimizer"] == row["optimizer"], (r["optimizer"], row["optimizer"])
            cells.append(
                f"{r['ratio_to_fused_adamw']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            )
        floor = row["floor_ratio_to_adamw"]
        lines.append(f"| {row['optimizer']} | " + " | ".join(cells) + f" | {floor:.3f}x |")
    return "\n".join(lines)


def data_loader_tables(payload: dict[str, Any]) -> str:
    """The data loader benchmark's own table printer (its schema is its own)."""
    import data_loader

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        data_loader.print_tables(payload)
    text = buf.getvalue().strip().splitlines()
    if text and text[0].startswith("`"):
        text = text[1:]  # the command line: printed above the tables already
    return "\n".join(text).strip()


def keras_step_table(payload: dict[str, Any]) -> str:
    """Median step per Keras backend and contender, and its ratio to Keras' AdamW."""
    first = payload["results"][0]
    lines = [
        f"{first['num_tensors']} tensors, {first['num_values']:,} values, Keras "
        f"{first['keras_version']}",
        "",
        "| backend | contender | median step (ms) | vs Keras AdamW |",
        "|---|---|---|---|",
    ]
    for r in payload["results"]:
        for name, ms in r["median_ms"].items():
            lines.append(
                f"| {r['backend']} | {name} | {ms:.1f} | {r['ratio_to_adamw'][name]:.2f}x |"
            )
    return "\n".join(lines)


def netsim_table(payload: dict[str, Any]) -> str:
    """All-reduce median per hosts x link rate, with the ring's lower bound."""
    rates = list(dict.fromkeys(r["rate"] for r in payload["rows"]))
    mbytes = payload["rows"][0]["mbytes"]
    lines = [
        f"{mbytes:g} MB gloo all-reduce, median of {payload['repeats']} (bound: a ring's "
        f"2 (n-1)/n x {mbytes:g} MB at the link rate)",
        "",
        "| hosts | " + " | ".join(_rate(None if r == "none" else r) for r in rates) + " |",
        "|---" * (len(rates) + 1) + "|",
    ]
    for hosts in sorted({r["hosts"] for r in payload["rows"]}):
        cells = []
        for rate in rates:
            row = next(
                (x for x in payload["rows"] if x["hosts"] == hosts and x["rate"] == rate), None
            )
            if row is None:
                cells.append("-")
                continue
            bound = row.get("lower_bound_s")
            cells.append(f"{row['median_s']:.3f} s" + (f" (bound {bound:.3f})" if bound else ""))
        lines.append(f"| {hosts} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_check_table(payload: dict[str, Any]) -> str:
    """``rangerdl plan``'s predictions against the measurements, and how many are within target."""
    import plan_check

    lines = [plan_check.table(payload["rows"]), ""]
    what = {"allreduce": "all-reduce", "step": "train time / step", "comm": "comm time / run"}
    for kind, s in payload["summary"].items():
        lines.append(
            f"- {what[kind]}: {s['within_target']}/{s['cells']} within "
            f"{100 * payload['target']:.0f}%; worst {100 * s['worst_error']:+.1f}% ({s['worst_cell']})"
        )
    return "\n".join(lines)


def compression_table(payload: dict[str, Any]) -> str:
    """Per payload: bytes per rank, DDP's bytes over them, the validation loss at equal steps
    over the seeds, and encode + decode time per sync as a share of one training step."""
    steps = payload["runs"][0]["steps"]
    lines = [
        f"{payload['workers']} workers, k = {payload['k']}, {steps} steps, "
        f"{payload['params']:,} parameters, block_size {payload['block_size']}, topk_density "
        f"{payload['topk_density']}, error feedback {'on' if payload['error_feedback'] else 'off'}",
        "",
        "| payload | MB per rank | DDP's bytes / these | val loss (seeds) | mean +- sd "
        "| encode + decode per sync / one step |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["summary"]:
        name = "DDP AdamW" if r["payload"] == "ddp" else r["payload"]
        losses = ", ".join(f"{v:.4f}" for v in r["val_loss"])
        share = r["codec_share_in_run"]
        lines.append(
            f"| {name} | {r['bytes_per_rank'] / 1e6:.1f} | {r['ddp_bytes_over_these']:.1f}x "
            f"| {losses} | {r['val_loss_mean']:.4f} +- {r['val_loss_sd']:.4f} "
            f"| {_num(None if share is None else 100 * share, '.1f')}{'%' if share else ''} |"
        )
    return "\n".join(lines)


def faults_table(payload: dict[str, Any]) -> str:
    """Per link: torchft replica groups and torchrun under the same kills: goodput, stalls,
    heal times, discarded syncs, equal models, final validation loss (torchrun's restarts resume
    bit for bit, so its loss is an unfaulted run's)."""
    o = payload["options"]
    lines = [
        f"{o['groups']} groups (hosts), k = {o['sync_every']}; quorum timeout "
        f"{o['quorum_timeout_s']:g} s; a kill every `kill every` seconds on average; each cell "
        "run on the date in the JSON",
        "",
        "| link | kill every (s) | CPU per host | heartbeat timeout (s) | path | steps | kills "
        "| goodput (vs clean before / after) | longest stall (s) | heal (s, median / max) "
        "| discarded syncs | groups equal | val loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in payload["cells"]:
        every = cell.get("kill_every_s", o["kill_every_s"])
        cpu = cell.get("cpu_per_host") or 0.0
        quota = f"{cpu:.2f} (quota)" if cpu else "shared"
        heartbeat = cell.get("heartbeat_timeout_ms", 2000) / 1000  # 2 s before it was an option
        paths = (("ft_faults", "torchft groups"), ("torchrun_faults", "torchrun restart"))
        for key, path in paths:
            name = f"{path}, overlap + eager" if cell.get("overlap") else path
            r = cell.get(key)
            if r is None:
                continue
            heals = sorted(t for t in r.get("heal_s", []) if t is not None)
            heal = f"{statistics.median(heals):.1f} / {heals[-1]:.1f}" if heals else "-"
            stall = _num(r.get("max_stall_s"), ".1f")
            equal = {True: "yes", False: "no", None: "-"}[r.get("equal")]
            good = _num(r.get("goodput"), ".2f")
            if r.get("goodput_vs_after") is not None:
                before, after = r["goodput_vs_before"], r["goodput_vs_after"]
                good += f" ({before:.2f} / {after:.2f})"
            lines.append(
                f"| {_rate(None if cell['link'] == 'none' else cell['link'])} | {every:g} "
                f"| {quota} | {f'{heartbeat:g}' if key == 'ft_faults' else '-'} | {name} "
                f"| {r['steps']} | {r['kills']} "
                f"| {good} | {stall if key == 'ft_faults' else '-'} "
                f"| {heal if key == 'ft_faults' else '-'} "
                f"| {_num(r.get('discarded'), '.0f') if key == 'ft_faults' else '-'} | {equal} "
                f"| {_num(r.get('val_loss'), '.4f')} |"
            )
    return "\n".join(lines)


def _ablation(section: str | None) -> Callable[[dict[str, Any]], str]:
    def render(payload: dict[str, Any]) -> str:
        import outer_ablation

        return outer_ablation.table(payload[section] if section else payload)

    return render


def _registry() -> dict[str, tuple[str, Callable[[dict[str, Any]], str]]]:
    """Table name -> (results file, renderer)."""
    from ttq import report as ttq_report

    return {
        "ttq_headline": ("ttq_protocol.json", ttq_report.headline_table),
        "ttq_cells": ("ttq_protocol.json", ttq_report.cells_tables),
        "ttq_tuning": ("ttq_protocol.json", ttq_report.tuning_table),
        "ttq_ablation": ("ttq_protocol.json", ttq_report.tuning_ablation_table),
        "ttq_recheck": ("ttq_protocol.json", ttq_report.recheck_table),
        "ttq_bounds": ("ttq_protocol.json", ttq_report.bounds_table),
        "ttq_seedstudy": ("ttq_protocol.json", ttq_report.seed_study_table),
        "ttq_wire": ("ttq_protocol.json", ttq_report.wire_table),
        "ttq_links": ("ttq_protocol.json", ttq_report.links_table),
        "outer_ablation": ("outer_ablation.json", _ablation(None)),
        "outer_ablation_retime": ("outer_ablation.json", _ablation("retime")),
        "plan_check": ("plan_check.json", plan_check_table),
        "netsim": ("netsim_allreduce.json", netsim_table),
        "convergence": ("convergence.json", convergence_tables),
        "optimizer_step": ("optimizer_step.json", optimizer_step_table),
        "data_loader": ("data_loader.json", data_loader_tables),
        "keras_step": ("keras_step.json", keras_step_table),
        "compression": ("compression.json", compression_table),
        "faults": ("faults.json", faults_table),
    }


def tables(results: Path = RESULTS) -> dict[str, str]:
    """Every table whose results file is in ``results``: name -> markdown."""
    out = {}
    cache: dict[str, Any] = {}
    for name, (file, render) in _registry().items():
        path = results / file
        if not path.is_file():
            continue
        if file not in cache:
            cache[file] = json.loads(path.read_text())
        out[name] = render(cache[file]).strip()
    return out


BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def doc_files(root: Path) -> list[Path]:
    """README.md and docs/*.md under ``root``."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def sync_docs(root: Path, made: dict[str, str], write: bool) -> list[str]:
    """Compare (``write``: rewrite) every table block under ``root`` with ``made``; returns the
    problems, each naming the file and the table."""
    problems = []
    for path in doc_files(root):
        text = path.read_text()

        def replace(m: re.Match[str], path: Path = path) -> str:
            name = m.group(2)
            if name not in made:
                known = ", ".join(sorted(made))
                problems.append(
                    f"{path}: unknown table {name!r} (or its results file is missing); known: {known}"
                )
                return m.group(0)
            body = made[name] + "\n"
            if m.group(3) != body and not write:
                problems.append(
                    f"{path}: table {name!r} differs from the results JSON "
                    "(python benchmarks/report.py --docs rewrites it)"
                )
            return m.group(1) + body + m.group(4)

        new = BLOCK.sub(replace, text)
        if write and new != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(new)
            tmp.replace(path)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--root", type=Path, default=REPO, help="where README.md and docs/ are")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--docs", action="store_true", help="rewrite the table blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 if a table block differs")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results}: no such folder")
    made = tables(args.results)
    if not (args.docs or args.check):
        for name, text in made.items():
            print(f"<!-- table: {name} -->\n{text}\n<!-- /table -->\n")
        return 0
    problems = sync_docs(args.root, made, write=args.docs)
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.docs and not problems:
        print(f"table blocks up to date in {', '.join(str(p) for p in doc_files(args.root))}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
