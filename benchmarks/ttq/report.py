"""The time-to-quality protocol's tables (markdown) and figure, from its JSON's runs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from rangerdl.distributed.cost import TBF_EFFICIENCY
from ttq import protocol as p

CELL_HEADER = (
    "| contender | lr | final loss at B steps: median (min-max) | vs target | rung (steps) "
    "| time to target (s): median (min-max) | seeds crossing | speedup over DDP "
    "| over best peer | of limit | MB per rank | bytes fewer | comm share | others' CPU |\n"
    + "|---" * 14
    + "|"
)


def _f(v: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, fmt) + suffix


def _pct(v: float | None) -> str:
    return _f(None if v is None else 100 * v, ".0f", "%")


def _spread(s: dict[str, Any], fmt: str) -> str:
    """``median (min-max)`` of a :func:`protocol._stats`, or the one value."""
    if s["median"] is None:
        return "-"
    if len(s["values"]) == 1:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def _time_cell(row: dict[str, Any]) -> str:
    t = row.get("time_to_target_s")
    if t is None and row.get("seed0_only"):
        s0 = row["seed0_only"]
        return f"seed 0 only: {s0['time_to_target_s']:.1f} at {s0['rung']} steps"
    if t is None:
        return "not reached"
    if "time_to_target_min_s" not in row:
        return f"{t:.1f}"
    hi = row.get("time_to_target_max_s")
    return f"{t:.1f} ({row['time_to_target_min_s']:.1f}-{'never' if hi is None else f'{hi:.1f}'})"


def cell_line(cell: dict[str, Any]) -> str:
    """The line above a cell's table: the target, DDP's spread, DDP's time and the limit."""
    d = cell["target_seeds"]
    goal = f"; goal {cell['speedup_target']}x over DDP" if cell["speedup_target"] else ""
    free = cell["ddp_no_limit_train_time_s"]
    times = cell["ddp_train_time_s"]["values"]  # the speedups divide their mean
    runs = f" (mean of {len(times)} runs)" if len(times) > 1 else ""
    steps = p.B[cell["cell"].split("-")[0]]
    return (
        f"**{cell['cell']}**: target {cell['target_val_loss']:.4f}, the median final loss of "
        f"{len(d['values'])} DDP AdamW seeds (min {d['min']:.4f}, max {d['max']:.4f}); DDP "
        f"trains its B = {steps} steps in {statistics.mean(times):.1f} s here{runs}, "
        f"{_f(free, '.1f', ' s')} with no rate limit: limit {_f(cell['limit'], '.2f', 'x')}{goal}"
    )


def cell_table(cell: dict[str, Any]) -> str:
    """One analysed cell: :func:`cell_line`, then one row per contender."""
    lines = [cell_line(cell), "", CELL_HEADER]
    for r in cell["rows"]:
        vs = r.get("vs_ddp")
        vs_s = "-" if vs is None or r["entry"] == "ddp_adamw" else f"{100 * vs:+.1f}%"
        mb = r.get("bytes_per_rank")
        cells = [
            r["entry"],
            f"{r['lr']:.3g}",
            _spread(r["equal_tokens"], ".4f"),
            vs_s,
            str(r.get("rung", "-")),
            _time_cell(r),
            r.get("seeds_crossing", "-"),
            _f(r.get("speedup"), ".2f", "x"),
            _f(r.get("speedup_over_best_peer"), ".2f", "x"),
            _pct(r.get("fraction_of_limit")),
            _f(None if mb is None else mb / 1e6, ".0f"),
            _f(r.get("bytes_fewer_than_ddp"), ".1f", "x"),
            _pct(r.get("comm_share")),
            _pct(r.get("others_cpu_share")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_table(payload: dict[str, Any]) -> str:
    """The headline cell's table (``protocol.HEADLINE``)."""
    cell = next((c for c in p.analyse(payload) if c["cell"] == p.HEADLINE), None)
    if cell is None:
        raise ValueError(f"no runs of the headline cell {p.HEADLINE}")
    return cell_table(cell)


def cells_tables(payload: dict[str, Any]) -> str:
    """Every analysed cell's table, headline first."""
    return "\n\n".join(cell_table(c) for c in p.analyse(payload))


def tuning_table(payload: dict[str, Any]) -> str:
    """Per tuning cell: each entry's final loss at each lr it tried, by factor of its grid's
    centre (the grid, then any trials past a winning edge); * = chosen."""
    runs = [r for r in payload["runs"] if r["stage"] == "tune" and r.get("ok")]
    centres = {**p.LR_CENTRE, **payload.get("constants", {}).get("lr_centre", {})}
    lines = []
    for cell in sorted({r["cell"] for r in runs}):
        workload = cell.split("-")[0]
        mine = [r for r in runs if r["cell"] == cell]

        def factor(r: dict[str, Any], workload: str = workload) -> float:
            centre = centres[workload][p.ENTRIES[r["entry"]].contender.optimizer]
            return 2 ** (round(2 * math.log2(r["lr"] / centre)) / 2)  # the grid's sqrt 2 steps

        factors = sorted({factor(r) for r in mine if r["entry"] in p.ENTRIES})
        lines.append(
            f"Tuning ({cell}, seed {p.TUNE_SEED}, final val loss after B steps; * = chosen)"
        )
        lines.append("")
        lines.append("| contender | " + " | ".join(f"x{f:.3g}" for f in factors) + " |")
        lines.append("|---" * (len(factors) + 1) + "|")
        for name in p.ENTRIES:
            rows = {factor(r): r for r in mine if r["entry"] == name}
            if not rows:
                continue
            best = min(rows.values(), key=lambda r: r["final_val_loss"])
            cells_s = [
                "-"
                if f not in rows
                else f"{rows[f]['lr']:.3g}: {rows[f]['final_val_loss']:.4f}"
                + ("*" if rows[f] is best else "")
                for f in factors
            ]
            lines.append(f"| {name} | " + " | ".join(cells_s) + " |")
        lines.append("")
    return "\n".join(lines).strip()


def describe(contender: p.Contender) -> str:
    """A contender in words: ``distributed Ranger k=8, bf16, overlap 4, eager``."""
    c = contender
    if c.strategy == "ddp":
        return f"DDP {'AdamW' if c.optimizer == 'adamw' else 'Ranger'}"
    if c.strategy == "post_local_sgd":
        return f"PostLocalSGD (AdamW) k={c.sync_every}"
    if c.strategy is None:
        return "single process Ranger"
    inner = "distributed Ranger" if c.optimizer == "ranger" else "OuterSync(AdamW)"
    parts = [f"{inner} k={c.sync_every}"]
    options = dict(x.removeprefix("--distributed.").split("=", 1) for x in c.extra)
    if c.comm_dtype != "fp32":
        parts.append(c.comm_dtype)
    if "compression" in options:
        parts.append(options["compression"])
    if c.overlap:
        parts.append(f"overlap {options.get('overlap_steps', 1)}")
        parts.append("eager" if c.eager else "not eager")
    if "outer_lr" in options:
        parts.append(f"outer lr {float(options['outer_lr']):g}")
    return ", ".join(parts)


def settings(entry: str, lr: float) -> str:
    """A distributed Ranger entry as the TOML keys a user sets:
    ``[optim] k = 4, lr = 0.016; [distributed] compression = "int8", overlap = true, ...``."""
    c = p.ENTRIES[entry].contender
    options = dict(x.removeprefix("--distributed.").split("=", 1) for x in c.extra)
    out = []
    compression = options.get("compression", "bf16" if c.comm_dtype == "bf16" else None)
    if compression:
        out.append(f'compression = "{compression}"')
    out.append(f"overlap = {str(c.overlap).lower()}")
    if c.overlap:
        out.append(f"overlap_steps = {options.get('overlap_steps', 1)}")
        out.append(f"eager = {str(c.eager).lower()}")
    return f"[optim] k = {c.sync_every}, lr = {lr:g}; [distributed] {', '.join(out)}"


def links_table(payload: dict[str, Any]) -> str:
    """Per cell, the distributed Ranger row that reached the target first: its settings, its
    time, speedups and bytes; the settings to start from on such a link."""
    lines = [
        "| cell | settings that reached the target first | time to target (s) | seeds | x DDP "
        "| x best peer | MB per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in p.analyse(payload):
        mine = [r for r in cell["rows"] if r["family"] == "rangerdl" and r.get("rung")]
        if not mine or not all("seeds_crossing" in r for r in mine):
            continue
        best = min(mine, key=lambda r: r["time_to_target_s"])
        mb = best.get("bytes_per_rank")
        lines.append(
            f"| {cell['cell']} | `{settings(best['entry'], best['lr'])}` | {_time_cell(best)} "
            f"| {best['seeds_crossing']} | {_f(best.get('speedup'), '.2f', 'x')} "
            f"| {_f(best.get('speedup_over_best_peer'), '.2f', 'x')} "
            f"| {_f(None if mb is None else mb / 1e6, '.0f')} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def tuning_ablation_table(payload: dict[str, Any], cell: str | None = None) -> str:
    """One row per tuned entry (GPT, 2 hosts by default): its best lr's final validation loss at
    B steps and the tuning seed (whole validation split), against DDP AdamW's best at the same
    seed."""
    cell = cell or p.tune_cell("gpt", 2)
    runs = [r for r in payload["runs"] if r["stage"] == "tune" and r["cell"] == cell and r["ok"]]
    best: dict[str, dict[str, Any]] = {}
    tried: dict[str, int] = {}
    for r in runs:
        tried[r["entry"]] = tried.get(r["entry"], 0) + 1
        if r["entry"] not in best or r["final_val_loss"] < best[r["entry"]]["final_val_loss"]:
            best[r["entry"]] = r
    ddp = best.get("ddp_adamw")
    if ddp is None:
        raise ValueError(f"no tuning runs of ddp_adamw in {cell}")
    lines = [
        "| contender | row | lrs tried | best lr | final val loss | vs DDP AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in p.ENTRIES.items():
        if name not in best:
            continue
        r = best[name]
        vs = (
            "-"
            if name == "ddp_adamw"
            else f"{100 * (r['final_val_loss'] / ddp['final_val_loss'] - 1):+.1f}%"
        )
        lines.append(
            f"| {describe(entry.contender)} | {name} | {tried[name]} | {r['lr']:.3g} "
            f"| {r['final_val_loss']:.4f} | {vs} |"
        )
    return "\n".join(lines)


def seed_study_table(payload: dict[str, Any], workload: str = "gpt") -> str:
    """DDP AdamW's target seeds and the seed study: validation loss along the run per (init
    seed, data-order seed, lr); the target seeds' order seed is their init seed."""
    rows = p.target_runs(payload, workload) + [
        r
        for r in payload["runs"]
        if r["stage"] == "seedstudy" and r["cell"].startswith(f"{workload}-") and r.get("ok")
    ]
    if not rows:
        return ""
    steps = sorted({int(s) for r in rows for s, _, _ in r["curve"]})
    show = [s for s in (32, 128, 512) if s in steps] + [max(steps)]
    lines = [
        "| init seed | data-order seed | lr | "
        + " | ".join(f"val loss at {s}" for s in show)
        + " |",
        "|---" * (3 + len(show)) + "|",
    ]
    key = lambda r: (r["stage"] != "run", r["lr"] != 0.002, r["seed"], r.get("data_seed", -1))  # noqa: E731
    for r in sorted(rows, key=key):
        at = {int(s): loss for s, _, loss in r["curve"]}
        data = r.get("data_seed", -1)
        lines.append(
            f"| {r['seed']} | {r['seed'] if data < 0 else data} | {r['lr']:.3g} | "
            + " | ".join(_f(at.get(s), ".4f") for s in show)
            + " |"
        )
    return "\n".join(lines)


def wire_table(payload: dict[str, Any]) -> str:
    """Counted against measured bytes: per cell and contender, the bytes each host's interface
    sent (``wire_tx_bytes_per_host``, averaged over the hosts) over rank 0's ``comm/bytes`` (the
    syncs only: the first broadcast of the weights, rendezvous and TCP ACKs are sent too), min-max
    over its runs; then divided by the Ethernet and TCP/IP headers a rate-limited link adds per
    1448-byte segment (``rangerdl.distributed.cost.TBF_EFFICIENCY``)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in payload["runs"]:
        wire, counted = r.get("wire_tx_bytes_per_host"), r.get("bytes_per_rank_counted")
        if r["stage"] == "run" and r.get("ok") and wire and counted:
            groups.setdefault((r["cell"], r["entry"]), []).append(wire / counted)
    if not groups:
        return ""
    lines = [
        "| cell | contender | runs | sent / counted | sent / (counted x 1514/1448) |",
        "|---|---|---|---|---|",
    ]
    for (cell, entry), ratios in sorted(groups.items()):
        lo, hi = min(ratios), max(ratios)
        framed = "-"  # no rate limit, no tbf: TCP segments of up to 64 KB (GSO), few headers
        if not cell.endswith("-nolimit"):
            framed = f"{lo * TBF_EFFICIENCY:.3f}-{hi * TBF_EFFICIENCY:.3f}"
        lines.append(f"| {cell} | {entry} | {len(ratios)} | {lo:.3f}-{hi:.3f} | {framed} |")
    return "\n".join(lines)


def recheck_table(payload: dict[str, Any]) -> str:
    """Reruns of committed runs: training time, and the time to the cell's target, then and
    now (the committed run: the cell's run of the same entry, lr, seed and steps with the same
    losses; none, "-", once a change of the code has replaced that run with another)."""
    lines = [
        "| date | cell | contender | steps | train (s): committed | now | now / committed "
        "| to target (s): committed | now | now / committed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for check in payload.get("rechecks", []):
        for row in check["rows"]:
            run, then, now = row["run"], row["committed_train_time_s"], row["train_time_s"]
            ratio = _f(now / then if now and then else None, ".3f")
            hit_then = hit_now = None
            finals = [p.final_loss(r) for r in p.target_runs(payload, check["cell"].split("-")[0])]
            if finals and run.get("ok"):
                target = statistics.median(finals)
                hit_now = p.time_to_target(run["curve"], target)
                key = p.run_key({**run, "stage": "run"})
                same = [
                    r
                    for r in payload["runs"]
                    if r.get("ok")
                    and p.run_key(r) == key
                    and r.get("final_val_loss") == run.get("final_val_loss")
                ]
                hit_then = p.time_to_target(same[-1]["curve"], target) if same else None
            hit_ratio = _f(hit_now / hit_then if hit_now and hit_then else None, ".3f")
            lines.append(
                f"| {check.get('date', '-')} | {check['cell']} | {run['entry']} "
                f"| {run['steps_budget']} | {_f(then, '.1f')} | {_f(now, '.1f')} | {ratio} "
                f"| {_f(hit_then, '.1f')} | {_f(hit_now, '.1f')} | {hit_ratio} |"
            )
    return "\n".join(lines)


def bounds_table(payload: dict[str, Any]) -> str:
    """Contenders run with no rate limit (the ``bound`` stage): their time to target there
    against their time in each cell and the cell's best peer."""
    lines = [
        "| cell | contender | steps | time to target with no rate limit (s): median (min-max) "
        "| seeds crossing | in the cell (s) | best peer in the cell (s) | most over the best peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in payload.get("bounds", []):
        times = list(b["no_limit_time_to_target_per_seed"].values())
        crossed = [t for t in times if t is not None]
        spread = "never"
        if crossed:
            last = f"{max(crossed):.1f}" if len(crossed) == len(times) else "never"
            spread = f"{min(crossed):.1f}-{last}"
        here = _f(b["time_to_target_s"], ".1f")
        if b["time_to_target_s"] is not None and b["rung"] != b["steps"]:
            here += f" (at {b['rung']} steps)"
        peer = "-"
        if b["best_peer"] is not None:
            peer = f"{b['best_peer_time_to_target_s']:.1f} ({b['best_peer']})"
        most = _f(b["most_over_best_peer"], ".2f")
        lines.append(
            f"| {b['cell']} | {b['entry']} | {b['steps']} "
            f"| {_f(b['no_limit_time_to_target_s'], '.1f')} ({spread}) | {b['seeds_crossing']} "
            f"| {here} | {peer} | {most if most == '-' else most + 'x'} |"
        )
    return "\n".join(lines)


def tables(payload: dict[str, Any]) -> str:
    """Everything the ``report`` stage prints: every cell, then the tuning table."""
    return "\n\n".join(x for x in (cells_tables(payload), tuning_table(payload)) if x)


COLOURS = {
    "ddp_adamw": "black",
    "post_local_sgd_k8": "tab:purple",
    "ranger_k8": "tab:blue",
    "ranger_k8_overlap4": "tab:orange",
    "ranger_k16_overlap4": "tab:green",
    "ranger_k32_overlap16": "tab:red",
    "lookahead_adamw_k8_overlap4": "tab:brown",
    "ranger_k8_bf16": "tab:cyan",
    "ranger_k8_overlap4_eager": "tab:olive",
    "ranger_k8_bf16_overlap4_eager": "tab:red",
    "ranger_k8_bf16_overlap8_eager": "tab:red",
}


def plot(payload: dict[str, Any], path: Path) -> None:
    """Validation loss vs training wall time per cell: each contender's curve up to its
    time-to-target rung (seed 0), DDP AdamW's seeds, the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = p.analyse(payload)
    b = p.budgets(payload)
    runs = [r for r in payload["runs"] if r["stage"] == "run" and r.get("ok")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    for ax, cell in zip(axes.flat, cells, strict=False):
        for row in cell["rows"]:
            steps = row.get("rung", b[cell["cell"].split("-")[0]])
            if row["entry"] != "ddp_adamw" and "rung" not in row:
                steps = max(x["steps"] for x in row["ladder"])  # never reached: longest rung
            pick = [
                r
                for r in runs
                if r["cell"] == cell["cell"]
                and r["entry"] == row["entry"]
                and r["steps_budget"] == steps
                and r["seed"] == 0
            ]
            colour = COLOURS.get(row["entry"])
            for r in pick:
                _, t, loss = zip(*r["curve"], strict=True)
                label = row["entry"] + (f" ({steps} steps)" if row["entry"] != "ddp_adamw" else "")
                ax.plot(t, loss, color=colour, lw=1.5, label=label)
            hit = p.time_to_target(pick[0]["curve"], cell["target_val_loss"]) if pick else None
            if hit is not None:  # where seed 0 crosses the target
                ax.plot([hit], [cell["target_val_loss"]], "x", color=colour)
        ax.axhline(cell["target_val_loss"], color="k", ls="-.", lw=0.8, label="target")
        ax.set_title(f"{cell['cell']} (limit {_f(cell['limit'], '.1f', 'x')})")
        ax.set_xlabel("training wall time (s), rank 0")
        ax.set_ylabel("validation loss")
        lo = cell["target_val_loss"]
        if lo < 0.5:  # a nearly saturated task (digits): its approach spans decades
            ax.set_yscale("log")
            ax.set_ylim(0.7 * lo, 30 * lo)
        else:
            ax.set_ylim(0.9 * lo, 1.6 * lo)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cells) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
