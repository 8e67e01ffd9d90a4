"""Time to DDP's quality, the fair way: tuning, equal tokens and a ladder of budgets.

The question a user asks: *how soon do I reach the quality DDP would give me?* Every contender
trains the same model (``configs/ttq_gpt.toml``, ``configs/ttq_digits.toml``) from the same seeds,
with the same global batch (workers x per-worker batch = DDP's batch) and the same data order,
through ``rangerdl train`` under ``torchrun``, one process per simulated host
(``benchmarks/netsim``; launcher, run-folder reading and interpolation from
``time_to_quality.py``). Stages, each writing ``benchmarks/results/ttq_protocol.json`` after every
run (a rerun replaces the runs it repeats and keeps the rest):

1. ``tune``: every contender gets the same tuning budget: ``TUNE_FACTORS`` (5) learning rates,
   the centre (the single-process sweep's best for its inner optimizer, ``time_to_quality.LR_SWEEP``)
   times 2^-1 ... 2^1, each trained for B steps with seed ``TUNE_SEED`` (not a scoring seed: no
   contender is tuned on the runs it is scored on); the lowest final validation loss wins. Runs on
   loopback (``torchrun --standalone``): a run's loss curve does not depend on the network (the
   same seed gives the same curve at any rate; only its wall-clock changes). ``TUNED_AS``: an
   entry that differs from another only in transport (bf16) takes that one's lr. Every cell uses
   the lrs tuned with 2 hosts.
2. ``run``: per cell, on the simulated network:
   - equal tokens: every contender at B steps (DDP AdamW's budget); seeds ``SEEDS`` for DDP AdamW
     and the headline contenders in the headline cell, seed 0 elsewhere; mean +- sd of the final
     validation loss (slow weights for Lookahead contenders; ``final_loss``). "Matches DDP" = within DDP AdamW's
     seed spread (mean +- sd), else the relative gap.
   - time to target: target = DDP AdamW's mean final validation loss at B steps. Each local
     contender trains through the ladder ``RUNGS`` (x B steps, rounded up to a multiple of its
     k; fixed in advance; the step budget sizes its LR schedule) in order and stops at the first
     rung whose run reaches the target; its time to target is the first crossing on the training
     wall clock (``time/train_s``, interpolated between evaluations). Longer rungs are not run
     once a rung reaches it (a longer schedule stays at a high LR longer and reaches a given loss
     later); the rungs that were run are all in the JSON. With several seeds, each climbs the
     ladder from seed 0's rung, and the row's rung is the first that every seed reaches (its
     time: the mean over seeds there).
   - per row: time to target, speedup over DDP (DDP AdamW's mean B-step training time / time to
     target), that speedup as a fraction of the cell's limit (DDP's time at the cell's rate /
     DDP's time with no rate limit: no method beats DDP by more), final loss at equal tokens,
     bytes per rank (``comm/bytes``), share of training time communicating.
3. ``report``: the tables (markdown) and the figure: each contender's curve up to its
   time-to-target rung, with the target line and DDP.

::

    python benchmarks/ttq_protocol.py tune              # ~8 min per entry (2 cores, loopback)
    python benchmarks/ttq_protocol.py run               # needs root (netsim)
    python benchmarks/ttq_protocol.py report

Over the house length: the contenders, the cells, the stages and the analysis are one protocol;
the launcher and run-folder reading already live in ``time_to_quality.py``. The natural cut, if
it grows, is the analysis/report half (``analyse``, ``tables``, ``plot``) into a module of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import atomic_write_json
from time_to_quality import (
    RESULTS,
    WORKLOADS,
    Contender,
    Suite,
    prepare_data,
    time_to_target,
)

OUT = RESULTS / "ttq_protocol.json"
B = {"gpt": 1024, "digits": 160}
"""DDP AdamW's step budget per workload (the target is its final loss); every rung of the
ladder is a multiple of every k used (8, 16, 32), so no run ends on a partial sync."""
TUNE_SEED = 100
TUNE_FACTORS = (0.5, 0.7071, 1.0, 1.4142, 2.0)
LR_CENTRE = {"gpt": {"adamw": 2e-3, "ranger": 1.6e-2}, "digits": {"adamw": 1e-2, "ranger": 3e-2}}
SEEDS = (0, 1, 2)
REDO_SINCE = time.time()
"""With ``--redo``: runs of this invocation (started after this) are kept, earlier ones dropped."""
QUICK = False
"""``--quick``: tiny models and budgets (a smoke test of the whole pipeline; numbers meaningless)."""
RUNGS = (1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Entry:
    """A contender of the protocol: how it trains (a ``time_to_quality.Contender``)."""

    name: str
    contender: Contender
    what: str

    @property
    def k(self) -> int:
        return self.contender.sync_every or 1


def _entries() -> dict[str, Entry]:
    def ranger(
        name: str,
        k: int,
        *extra: str,
        overlap: bool = False,
        dtype: str = "fp32",
        eager: bool = False,
    ) -> Entry:
        c = Contender(
            name,
            "lookahead",
            "ranger",
            k,
            overlap=overlap,
            eager=eager,
            comm_dtype=dtype,
            extra=extra,
        )
        return Entry(name, c, "distributed Ranger")

    out = [
        Entry("ddp_adamw", Contender("ddp_adamw", "ddp", "adamw"), "torch DDP, AdamW (target)"),
        Entry(
            "post_local_sgd_k8",
            Contender("post_local_sgd_k8", "post_local_sgd", "adamw", 8),
            "torch PostLocalSGDOptimizer over AdamW, averaging every 8 steps",
        ),
        ranger("ranger_k8", 8),
        ranger("ranger_k8_bf16", 8, dtype="bf16"),
        ranger("ranger_k16_bf16", 16, dtype="bf16"),  # the slow-link (20 Mbit/s) candidate
        # overlapped: the all-reduce runs during the next `d` local steps (overlap_steps), chosen
        # so that d steps of compute (~45 ms each here) cover its wire time at the cell's rate
        ranger("ranger_k8_overlap4", 8, "--distributed.overlap_steps=4", overlap=True),
        ranger("ranger_k16_overlap4", 16, "--distributed.overlap_steps=4", overlap=True),
        ranger("ranger_k32_overlap16", 32, "--distributed.overlap_steps=16", overlap=True),
        # 20 Mbit/s: a bf16 exchange takes ~0.5 s (measured), ~9 steps of compute: overlapped 8 steps
        ranger(
            "ranger_k8_bf16_overlap8",
            8,
            "--distributed.overlap_steps=8",
            overlap=True,
            dtype="bf16",
        ),
        ranger(
            "ranger_k16_bf16_overlap8",
            16,
            "--distributed.overlap_steps=8",
            overlap=True,
            dtype="bf16",
        ),
        # eager: the outer step at launch with the worker's own pseudo-gradient, corrected when
        # the mean arrives ([distributed] eager)
        ranger(
            "ranger_k8_bf16_overlap8_eager",
            8,
            "--distributed.overlap_steps=8",
            overlap=True,
            eager=True,
            dtype="bf16",
        ),
        ranger(
            "ranger_k16_bf16_overlap8_eager",
            16,
            "--distributed.overlap_steps=8",
            overlap=True,
            eager=True,
            dtype="bf16",
        ),
        ranger(
            "ranger_k8_bf16_overlap4_eager",
            8,
            "--distributed.overlap_steps=4",
            overlap=True,
            dtype="bf16",
            eager=True,
        ),
        ranger(
            "ranger_k8_overlap4_eager",
            8,
            "--distributed.overlap_steps=4",
            overlap=True,
            eager=True,
        ),
        ranger("ranger_k32", 32),  # equal tokens at k = 32 (tuning table only)
        # the outer step: alpha = 1 (plain averaging, as post-local SGD) instead of Lookahead's 0.5
        ranger("ranger_k32_outer1", 32, "--distributed.outer_lr=1.0"),
        ranger("ranger_k8_outer1", 8, "--distributed.outer_lr=1.0"),
        Entry(
            "lookahead_adamw_k8_overlap4",
            Contender(
                "lookahead_adamw_k8_overlap4",
                "lookahead",
                "adamw",
                8,
                overlap=True,
                extra=("--distributed.overlap_steps=4",),
            ),
            "OuterSync around AdamW (distributed Lookahead(AdamW), alpha 0.5): the inner-optimizer "
            "ablation",
        ),
    ]
    return {e.name: e for e in out}


ENTRIES = _entries()


# ---------------------------------------------------------------------------------- storage
def load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"what": "time to DDP AdamW's quality: tuning, equal tokens, ladder", "runs": []}


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["stage"], r["cell"], r["entry"], r["lr"], r["seed"], r["steps_budget"])


def save_run(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    payload = load(path)
    payload["runs"] = [r for r in payload["runs"] if _key(r) != _key(row)] + [row]
    atomic_write_json(path, payload)
    return payload


# ---------------------------------------------------------------------------------- running
class Runner:
    """Runs one training of an entry (lr, seed, steps) in a cell; loopback or netsim."""

    def __init__(
        self, workdir: Path, workload: str, hosts: int, rate: str | None, netsim: bool = True
    ) -> None:
        self.workdir, self.workload, self.hosts, self.rate = workdir, workload, hosts, rate
        self.netsim = netsim
        self.cluster: Any = None
        env = {"RANGERDL_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}
        self.suite = Suite(workdir, netsim, False, timeout_s=3600.0, env=env)

    @property
    def cell(self) -> str:
        where = (self.rate or "nolimit") if self.netsim else "loopback"
        return f"{self.workload}-{self.hosts}h-{where}"

    def __enter__(self) -> Runner:
        if self.netsim:
            from netsim import Cluster

            self.cluster = Cluster(num_hosts=self.hosts, rate=self.rate).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def run(
        self, entry: Entry, lr: float, seed: int, steps: int, stage: str, eval_every: int
    ) -> dict[str, Any]:
        w = WORKLOADS[self.workload]
        budget: tuple[str, ...] = (f"--train.steps={steps}", f"--train.eval_every={eval_every}")
        if stage == "run":  # one metric along the whole curve: the final point on the same windows
            budget += (f"--train.final_eval_batches={periodic_batches(self.workload)}",)
        if QUICK:  # the workload's tiny sizes, keeping this budget
            budget = (*(a for a in w.quick if not a.startswith("--train.")), *budget)
        c = replace(entry.contender, extra=(*entry.contender.extra, *budget, f"--run.seed={seed}"))
        w = replace(w, lr={**w.lr, c.optimizer: lr})
        tag = f"{stage}-{self.cell}-lr{lr:.3g}-s{seed}-b{steps}"
        t0 = time.time()
        row = self.suite.run(w, c, self.hosts, self.rate, self.cluster, tag)
        row |= {"stage": stage, "cell": self.cell, "entry": entry.name, "lr": lr, "seed": seed}
        row |= {"steps_budget": steps, "started": t0, "eval_every": eval_every}
        return row


def periodic_batches(workload: str) -> int:
    """The workload's ``[train] eval_batches``: the run stage scores every point of a curve, the
    final one included, on these validation batches (0: the whole split)."""
    from rangerdl.train.config import load_config

    return load_config(WORKLOADS[workload].config).train.eval_batches


def tune(names: list[str], workload: str, hosts: int, out: Path) -> None:
    """Stage 1: the lr grid of every entry in ``names``, seed TUNE_SEED, B steps, loopback."""
    steps = B[workload]
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-tune-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, False, {workload})
        with Runner(workdir, workload, hosts, None, netsim=False) as runner:
            for name in names:
                e = ENTRIES[name]
                centre = LR_CENTRE[workload][e.contender.optimizer]
                for f in TUNE_FACTORS:
                    lr = float(f"{centre * f:.3g}")
                    row = runner.run(e, lr, TUNE_SEED, steps, "tune", eval_every=steps)
                    save_run(out, row)


TUNED_AS = {"ranger_k8_bf16": "ranger_k8"}
"""Entries that take another's tuned lr: the same optimizer and sync, only the transport differs
(bf16 pseudo-gradients instead of fp32 weights)."""


def tuned_lr(payload: dict[str, Any], workload: str, hosts: int, name: str) -> float | None:
    """The tuning winner: lowest final val loss among the entry's tune runs."""
    cell = f"{workload}-{hosts}h-loopback"
    name = TUNED_AS.get(name, name)
    runs = [
        r
        for r in payload["runs"]
        if r["stage"] == "tune" and r["cell"] == cell and r["entry"] == name and r.get("ok")
    ]
    return min(runs, key=lambda r: r["final_val_loss"])["lr"] if runs else None


# ---------------------------------------------------------------------------------- the cells
@dataclass(frozen=True)
class CellSpec:
    """A (workload, hosts, rate) setting and the contenders run in it."""

    workload: str
    hosts: int
    rate: str
    entries: tuple[str, ...]
    seeds: int = 1
    """Seeds for DDP AdamW and the best two local contenders (3 in the headline cell)."""

    @property
    def key(self) -> str:
        return f"{self.workload}-{self.hosts}h-{self.rate}"


HEADLINE = "gpt-2h-100mbit"
CELLS = (
    CellSpec(
        "gpt",
        2,
        "100mbit",
        (
            "ddp_adamw",
            "post_local_sgd_k8",
            "ranger_k8_bf16",  # blocking; ranger_k8 (fp32) has its lr and curve
            "ranger_k8_bf16_overlap4_eager",  # the same, overlapped (ranger_k8_overlap4_eager: fp32)
        ),
        seeds=3,
    ),
    # at 20 Mbit/s a bf16 sync takes ~0.5 s, ~9 steps of compute: blocking, then overlapped for
    # 8 steps, eager (without eager the overlap loses 13% of loss per step; k=16 eager 4% more
    # than k=8 eager: ablation)
    CellSpec("gpt", 2, "20mbit", ("ddp_adamw", "ranger_k8_bf16", "ranger_k8_bf16_overlap8_eager")),
    CellSpec("gpt", 4, "100mbit", ("ddp_adamw", "ranger_k8_bf16")),
    CellSpec(
        "digits", 2, "100mbit", ("ddp_adamw", "post_local_sgd_k8", "ranger_k8_overlap4_eager")
    ),
)
TARGETS = {
    "gpt-2h-100mbit": 2.5,
    "gpt-2h-20mbit": 8.0,
    "gpt-4h-100mbit": 2.0,
}
"""Issue 10's speedup targets (time to DDP AdamW's final loss)."""
EVAL_EVERY = {"gpt": 32, "digits": 16}


def rung_steps(workload: str, k: int) -> list[int]:
    """The ladder: RUNGS x B rounded up to a multiple of k (no partial final sync)."""
    return sorted({-(-round(r * B[workload]) // k) * k for r in RUNGS})


def run_cell(spec: CellSpec, out: Path, redo: bool, tuning: Path | None = None) -> None:
    """Stage 2 for one cell: DDP's seeds (+ its no-limit time), every local contender's ladder at
    seed 0, then the best two again at the other seeds: at B (equal tokens) and up the ladder
    from seed 0's rung until each reaches the target, then every seed at the highest such rung.
    Learning rates: the tuning winners in ``tuning`` (default: ``out``), found with 2 hosts."""
    payload = load(tuning or out)
    if tuning is not None:  # carry the tuning runs along, so that `out` tells the whole story
        tuned = [r for r in payload["runs"] if r["stage"] == "tune"]
        mine = load(out)
        keep = {_key(r) for r in tuned}
        mine["runs"] = [r for r in mine["runs"] if _key(r) not in keep] + tuned
        atomic_write_json(out, mine)
    if redo:  # a fresh cell: no run of an earlier invocation mixes into this one's analysis
        mine = load(out)
        cells = {spec.key, f"{spec.workload}-{spec.hosts}h-nolimit"}
        mine["runs"] = [
            r
            for r in mine["runs"]
            if r["stage"] != "run" or r["cell"] not in cells or r["started"] >= REDO_SINCE
        ]
        atomic_write_json(out, mine)
    lrs = {n: tuned_lr(payload, spec.workload, 2, n) for n in spec.entries}
    missing = [n for n, lr in lrs.items() if lr is None]
    if missing:
        raise SystemExit(f"{spec.key}: no tuning runs for {', '.join(missing)}: run `tune` first")
    steps_b, every = B[spec.workload], EVAL_EVERY[spec.workload]
    seeds = SEEDS[: spec.seeds]

    def done(entry: str, seed: int, steps: int, cell: str) -> dict[str, Any] | None:
        key = ("run", cell, entry, lrs[entry], seed, steps)
        rows = [r for r in load(out)["runs"] if _key(r) == key and r.get("ok")]
        if redo:  # only this invocation's runs count
            rows = [r for r in rows if r["started"] >= REDO_SINCE]
        return rows[-1] if rows else None

    def go(runner: Runner, entry: str, seed: int, steps: int) -> dict[str, Any]:
        row = done(entry, seed, steps, runner.cell)
        if row is None:
            row = runner.run(ENTRIES[entry], lrs[entry], seed, steps, "run", every)
            save_run(out, row)
        return row

    with tempfile.TemporaryDirectory(prefix="rdl-ttq-run-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, False, {spec.workload})
        with Runner(workdir, spec.workload, spec.hosts, None) as runner:
            go(runner, "ddp_adamw", 0, steps_b)  # the cell's limit: DDP with no rate limit
        with Runner(workdir, spec.workload, spec.hosts, spec.rate) as runner:
            ddp = [go(runner, "ddp_adamw", s, steps_b) for s in seeds]
            target = statistics.mean(final_loss(r) for r in ddp if r.get("ok"))
            reached: dict[str, tuple[int, float]] = {}
            for name in spec.entries[1:]:
                for steps in rung_steps(spec.workload, ENTRIES[name].k):
                    row = go(runner, name, 0, steps)
                    t = time_to_target(row["curve"], target) if row.get("ok") else None
                    if t is not None:
                        reached[name] = (steps, t)
                        break
            best = sorted(reached, key=lambda n: reached[n][1])[:2]
            for name in best:
                ladder = rung_steps(spec.workload, ENTRIES[name].k)
                first = {0: reached[name][0]}
                for seed in seeds[1:]:
                    go(runner, name, seed, steps_b)  # equal tokens
                    for steps in (s for s in ladder if s >= reached[name][0]):
                        row = go(runner, name, seed, steps)
                        first[seed] = steps
                        if row.get("ok") and time_to_target(row["curve"], target) is not None:
                            break
                for seed in seeds:  # the row's rung: the first that every seed reaches
                    go(runner, name, seed, max(first.values()))


# ---------------------------------------------------------------------------------- analysis
def final_loss(run: dict[str, Any]) -> float:
    """The validation loss at the run's last step (slow weights for Lookahead contenders). In the
    run stage every point of a curve, this one included, scores the same validation windows (the
    workload's ``eval_batches``: 512 fixed windows for GPT, the whole split for digits;
    ``--train.final_eval_batches``), so the target (DDP's mean of these) and a contender's
    crossing, wherever it falls, are measured alike. Tuning scores the whole split instead."""
    step, _, loss = run["curve"][-1]
    if step != run["steps_budget"]:
        raise ValueError(f"{run['entry']}: no evaluation at the final step {run['steps_budget']}")
    return float(loss)


def rung_reached(runs: list[dict[str, Any]], target: float) -> int | None:
    """The row's rung: the smallest step budget at which every seed the contender ran has a run
    and every one of those runs reaches ``target`` (None: no such rung). A rung that seed 0
    reaches but another seed does not is passed over: the ladder goes on for every seed."""
    seeds = {r["seed"] for r in runs}
    for steps in sorted({r["steps_budget"] for r in runs}):
        at = [r for r in runs if r["steps_budget"] == steps]
        if {r["seed"] for r in at} == seeds and all(
            time_to_target(r["curve"], target) is not None for r in at
        ):
            return int(steps)
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "values": values,
        "mean": statistics.mean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
    }


def analyse(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: target, DDP's time and the cell's limit; per contender: equal-token finals,
    ladder, time to target per seed, speedup, fraction of the limit, bytes, comm share."""
    runs = [r for r in payload["runs"] if r["stage"] == "run" and r.get("ok")]
    out = []
    for spec in CELLS:
        cell = [r for r in runs if r["cell"] == spec.key]
        free = [
            r
            for r in runs
            if r["cell"] == f"{spec.workload}-{spec.hosts}h-nolimit" and r["entry"] == "ddp_adamw"
        ]
        steps_b = B[spec.workload]
        ddp = [r for r in cell if r["entry"] == "ddp_adamw" and r["steps_budget"] == steps_b]
        if not ddp:
            continue
        target = statistics.mean(final_loss(r) for r in ddp)
        ddp_time = statistics.mean(r["train_time_s"] for r in ddp)
        limit = ddp_time / free[0]["train_time_s"] if free else None
        ddp_finals = _stats([final_loss(r) for r in ddp])
        summary: dict[str, Any] = {
            "cell": spec.key,
            "target_val_loss": target,
            "ddp_final": ddp_finals,
            "ddp_train_time_s": _stats([r["train_time_s"] for r in ddp]),
            "ddp_no_limit_train_time_s": free[0]["train_time_s"] if free else None,
            "limit": limit,
            "speedup_target": TARGETS.get(spec.key),
            "rows": [],
        }
        lo = ddp_finals["mean"] - (ddp_finals["sd"] or 0.0)
        hi = ddp_finals["mean"] + (ddp_finals["sd"] or 0.0)
        for name in spec.entries:
            mine = [r for r in cell if r["entry"] == name]
            if not mine:
                continue
            equal = [r for r in mine if r["steps_budget"] == steps_b]
            finals = _stats([final_loss(r) for r in equal])
            row: dict[str, Any] = {"entry": name, "lr": mine[0]["lr"], "k": ENTRIES[name].k}
            row["what"] = ENTRIES[name].what
            row["equal_tokens"] = finals
            if finals["mean"] is not None:
                row["vs_ddp"] = finals["mean"] / target - 1
                row["matches_ddp"] = lo <= finals["mean"] <= hi or finals["mean"] < lo
            ladder = sorted((r for r in mine if r["seed"] == 0), key=lambda r: r["steps_budget"])
            row["ladder"] = [
                {
                    "steps": r["steps_budget"],
                    "final_val_loss": final_loss(r),
                    "final_val_loss_whole_split": r["final_val_loss"],
                    "train_time_s": r["train_time_s"],
                    "time_to_target_s": time_to_target(r["curve"], target),
                }
                for r in ladder
            ]
            hit = rung_reached(mine, target)
            if name == "ddp_adamw":
                row["time_to_target_s"] = ddp_time
                hit_rows = ddp
            elif hit is not None:
                row["rung"] = hit
                hit_rows = sorted(
                    (r for r in mine if r["steps_budget"] == hit), key=lambda r: r["seed"]
                )
                times = [time_to_target(r["curve"], target) for r in hit_rows]
                row["time_to_target_per_seed"] = times
                row["time_to_target_s"] = statistics.mean(times)  # type: ignore[arg-type]
            else:
                hit_rows = []
                first = next((x for x in row["ladder"] if x["time_to_target_s"] is not None), None)
                if first is not None:  # seed 0 reached it, another seed not within the ladder
                    row["seed0_rung"] = first["steps"]
            t = row.get("time_to_target_s")
            if t and name != "ddp_adamw":
                row["speedup"] = ddp_time / t
                row["fraction_of_limit"] = row["speedup"] / limit if limit else None
            if hit_rows:
                r0 = hit_rows[0]
                row["bytes_per_rank"] = r0.get("bytes_per_rank_counted")
                ddp_bytes = ddp[0].get("bytes_per_rank_counted")
                if row["bytes_per_rank"] and ddp_bytes:
                    row["bytes_fewer_than_ddp"] = ddp_bytes / row["bytes_per_rank"]
                if r0.get("comm_time_s") is not None and name != "ddp_adamw":
                    row["comm_share"] = r0["comm_time_s"] / r0["train_time_s"]
                elif free:  # DDP overlaps its all-reduce with backward: 1 - T(no limit) / T
                    row["comm_share"] = 1 - free[0]["train_time_s"] / r0["train_time_s"]
                row["others_cpu_share"] = max(r.get("others_cpu_share") or 0 for r in hit_rows)
            summary["rows"].append(row)
        out.append(summary)
    return out


def _f(v: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, fmt) + suffix


def tables(payload: dict[str, Any]) -> str:
    """Markdown: the headline table per cell, then the tuning table."""
    lines = []
    for cell in analyse(payload):
        d = cell["ddp_final"]
        limit = cell["limit"]
        lines.append(
            f"**{cell['cell']}**: target {cell['target_val_loss']:.4f} (DDP AdamW, "
            f"{len(d['values'])} seed(s){', sd ' + format(d['sd'], '.4f') if d['sd'] else ''}), "
            f"DDP {cell['ddp_train_time_s']['mean']:.1f} s; limit {_f(limit, '.2f', 'x')}"
            + (f"; target speedup {cell['speedup_target']}x" if cell["speedup_target"] else "")
        )
        lines.append("")
        lines.append(
            "| contender | lr | final loss at B steps (seeds) | vs DDP | rung (steps) "
            "| time to target (s) | speedup | of limit | bytes fewer | comm share | others' CPU |"
        )
        lines.append("|---" * 11 + "|")
        for r in cell["rows"]:
            eq = r["equal_tokens"]
            eq_s = "-"
            if eq["mean"] is not None:
                eq_s = f"{eq['mean']:.4f}" + (f" +- {eq['sd']:.4f}" if eq["sd"] else "")
                eq_s += f" ({len(eq['values'])})"
            vs = r.get("vs_ddp")
            vs_s = "-" if vs is None else f"{100 * vs:+.1f}%"
            if r["entry"] != "ddp_adamw" and r.get("matches_ddp"):
                vs_s += " (within)" if vs is not None and vs >= 0 else " (below)"
            lines.append(
                f"| {r['entry']} | {r['lr']:.3g} | {eq_s} | {vs_s} | {r.get('rung', '-')} "
                f"| {_time_cell(r)} "
                f"| {_f(r.get('speedup'), '.2f', 'x')} "
                f"| {_f(None if r.get('fraction_of_limit') is None else 100 * r['fraction_of_limit'], '.0f', '%')} "
                f"| {_f(r.get('bytes_fewer_than_ddp'), '.1f', 'x')} "
                f"| {_f(None if r.get('comm_share') is None else 100 * r['comm_share'], '.0f', '%')} "
                f"| {_f(None if r.get('others_cpu_share') is None else 100 * r['others_cpu_share'], '.0f', '%')} |"
            )
        lines.append("")
    lines.append(tuning_table(payload))
    return "\n".join(lines)


def _time_cell(row: dict[str, Any]) -> str:
    t = row.get("time_to_target_s")
    if t is not None:
        return f"{t:.1f}"
    if row.get("seed0_rung"):
        return f"seed 0 at {row['seed0_rung']} steps; not every seed within the ladder"
    return "not reached"


def tuning_table(payload: dict[str, Any]) -> str:
    runs = [r for r in payload["runs"] if r["stage"] == "tune" and r.get("ok")]
    cells = sorted({r["cell"] for r in runs})
    lines = []
    for cell in cells:
        mine = [r for r in runs if r["cell"] == cell]
        lines.append(f"Tuning ({cell}, seed {TUNE_SEED}, final val loss after B steps; * = chosen)")
        lines.append("")
        lines.append("| contender | " + " | ".join(f"x{f:.3g}" for f in TUNE_FACTORS) + " |")
        lines.append("|---" * (len(TUNE_FACTORS) + 1) + "|")
        for name in ENTRIES:
            rows = sorted((r for r in mine if r["entry"] == name), key=lambda r: r["lr"])
            if not rows:
                continue
            best = min(rows, key=lambda r: r["final_val_loss"])
            cells_s = [
                f"{r['lr']:.3g}: {r['final_val_loss']:.4f}" + ("*" if r is best else "")
                for r in rows
            ]
            lines.append(f"| {name} | " + " | ".join(cells_s) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Validation loss vs training wall time per cell: each contender's curve up to its
    time-to-target rung (seed 0), DDP AdamW's seeds, the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = analyse(payload)
    runs = [r for r in payload["runs"] if r["stage"] == "run" and r.get("ok")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    colours = {"ddp_adamw": "black", "post_local_sgd_k8": "tab:purple", "ranger_k8": "tab:blue"}
    colours |= {"ranger_k8_overlap4": "tab:orange", "ranger_k16_overlap4": "tab:green"}
    colours |= {"ranger_k32_overlap16": "tab:red", "lookahead_adamw_k8_overlap4": "tab:brown"}
    colours |= {"ranger_k8_bf16": "tab:cyan", "ranger_k8_overlap4_eager": "tab:olive"}
    colours |= {
        "ranger_k8_bf16_overlap4_eager": "tab:red",
        "ranger_k8_bf16_overlap8_eager": "tab:red",
    }
    for ax, cell in zip(axes.flat, cells, strict=False):
        for row in cell["rows"]:
            steps = row.get("rung", B[cell["cell"].split("-")[0]])
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
            for r in pick:
                _, t, loss = zip(*r["curve"], strict=True)
                label = row["entry"] + (f" ({steps} steps)" if row["entry"] != "ddp_adamw" else "")
                ax.plot(t, loss, color=colours.get(row["entry"]), lw=1.5, label=label)
            hit = time_to_target(pick[0]["curve"], cell["target_val_loss"]) if pick else None
            if hit is not None:  # where seed 0 crosses the target
                ax.plot([hit], [cell["target_val_loss"]], "x", color=colours.get(row["entry"]))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("tune", help="stage 1: equal lr-tuning budget, loopback")
    t.add_argument("--entries", nargs="+", choices=list(ENTRIES), default=list(ENTRIES))
    t.add_argument("--workload", choices=list(B), default="gpt")
    t.add_argument("--hosts", type=int, default=2)
    r = sub.add_parser("run", help="stage 2: the cells on the simulated network (root)")
    r.add_argument("--cells", nargs="+", choices=[c.key for c in CELLS])
    r.add_argument("--redo", action="store_true", help="rerun runs already in the JSON")
    r.add_argument("--tuning", type=Path, help="JSON with the tune runs (default: --out)")
    rep = sub.add_parser("report", help="stage 3: tables and figure from the JSON")
    for p in (t, r, rep):
        p.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes and budgets")
    args = parser.parse_args(argv)
    if args.quick:
        global QUICK
        QUICK = True
        B.update(gpt=64, digits=16)
        global TUNE_FACTORS
        TUNE_FACTORS = (1.0,)
        EVAL_EVERY.update(gpt=16, digits=8)
    if args.stage == "tune":
        tune(args.entries, args.workload, args.hosts, args.out)
    elif args.stage == "run":
        from netsim import available

        ok, why = available()
        if not ok:
            raise SystemExit(f"netsim unavailable ({why}): the cells need the rate limit")
        for spec in CELLS:
            if not args.cells or spec.key in args.cells:
                run_cell(spec, args.out, args.redo, args.tuning)
    payload = load(args.out)
    payload |= {
        "protocol": (__doc__ or "").split("::")[0].strip(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "constants": {
            "B": B,
            "tune_seed": TUNE_SEED,
            "tune_factors": TUNE_FACTORS,
            "lr_centre": LR_CENTRE,
            "seeds": SEEDS,
            "rungs": RUNGS,
            "targets": TARGETS,
        },
        "entries": {n: {"what": e.what, **vars(e.contender)} for n, e in ENTRIES.items()},
        "last_command": shlex.join(["python", "benchmarks/ttq_protocol.py", *sys.argv[1:]]),
    }
    payload["command"] = (
        "python benchmarks/ttq_protocol.py tune; python benchmarks/ttq_protocol.py run"
    )
    payload["cells"] = analyse(payload)
    atomic_write_json(args.out, payload)
    if payload["cells"]:
        plot(payload, args.out.with_suffix(".png"))
    print(tables(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
