"""Time to quality on a slow network: DDP, PostLocalSGD and distributed Ranger on simulated hosts.

Every contender trains the same model from the same seed, with the same global batch and the same
number of optimizer steps, through ``rangerdl train`` under ``torchrun``, one process per
simulated host (``benchmarks/netsim``: network namespaces behind a tbf-limited bridge; 1 torch
thread per host). Contenders:

- ``ddp_adamw``, ``ddp_ranger``: torch ``DistributedDataParallel``, gradient all-reduce every step.
- ``post_local_sgd_k16``: torch ``PostLocalSGDOptimizer`` over AdamW, model averaging every 16
  steps (AdamW inside, like the DDP baseline, so the row isolates periodic averaging).
- ``ranger_kK`` (K = 8, 16, 32): distributed Ranger (``strategy = "lookahead"``): local Ranger
  steps, the Lookahead slow weights synchronised every K steps (outer lr = alpha = 0.5);
  ``_overlap``: the all-reduce runs while the next local steps are taken; ``_bf16``: the
  pseudo-gradient travels in bf16. (Overlap + bf16 together is measured by ``ttq_protocol.py``.)
- ``single_ranger``: one process, the whole global batch: the reference.

Definitions (also written into the JSON):

- Time axis: ``time/train_s`` of ``metrics.jsonl``: training wall seconds on rank 0, evaluation and
  checkpointing excluded. Validation runs every ``eval_every`` steps on the same fixed validation
  windows for everyone (Lookahead contenders are evaluated on their slow weights).
- Target: the final validation loss of ``ddp_adamw`` in the same cell. ``time_to_target_s``: the
  first time a contender's validation loss is <= target, linearly interpolated in (time, loss)
  between the evaluation before and the one that crosses; if the first evaluation already crosses,
  its time (an upper bound); None if never reached within the step budget.
  ``time_to_target_2pct_s``: the same for target x 1.02 ("within 2%").
  ``speedup_at_final``: the other way round, DDP AdamW's time to reach this contender's final loss
  divided by this contender's time to reach it (None if DDP never gets there).
- ``bytes_per_rank``: rangerdl's ring-model count of training traffic (2 (W-1)/W x values x
  bytes per all-reduce, rank 0, including the final sync of ``finish()``): ``comm/bytes``, which
  for every strategy leaves out the one-time broadcast of rank 0's weights (logged apart as
  ``comm/broadcast_bytes``). The committed results were made while distributed Ranger still
  counted that broadcast in ``comm/bytes`` and this script subtracted it: the same numbers.
  ``wire_tx_bytes_per_host``: the mean over hosts of the tx byte counter of each host's interface
  (everything: TCP/IP headers, rendezvous, evaluation, checkpoint and teardown traffic).
- ``comm_share``: the share of training wall time spent communicating. Where communication blocks
  (distributed Ranger, PostLocalSGD), ``comm/time_s`` (seconds inside blocking collectives and
  waits) / ``train_time_s``. DDP overlaps its all-reduce with backward, so there it is
  1 - T(no limit) / T: the training time the rate limit adds, against the same contender on the
  same number of hosts with no rate limit (a lower bound: unthrottled veth still costs something).
  ``comm_share_vs_unlimited`` gives that second measure for every contender that has an unlimited
  run, so the two measures can be compared.
- ``others_cpu_share``: CPU time used by processes other than the benchmark's during a run, as a
  share of all cores: the machine is shared, and this says how much a timing may be off.

Learning rates: one per optimizer, the same for every contender that uses it, picked in a
single-process sweep on each workload during development (``LR_SWEEP``, final validation loss
after the full step budget, flat_anneal schedule; not re-run by this script). Each optimizer
keeps its own defaults otherwise: AdamW betas (0.9, 0.999), eps 1e-8; Ranger (0.95, 0.999), 1e-5.

Writes ``benchmarks/results/time_to_quality.json`` (every run's exact command, curve and numbers)
and ``time_to_quality.png`` (headline cell) plus ``time_to_quality_cells.png`` (all cells)::

    python benchmarks/time_to_quality.py            # the suite (~30 min on 2 cores; needs root)
    python benchmarks/time_to_quality.py --quick    # smoke test, numbers meaningless
    python benchmarks/time_to_quality.py --no-netsim  # torchrun --standalone, no rate limit

This file is longer than the house limit: the contender/cell matrix, the launcher (netsim,
plain torchrun, single process, with CPU and interface accounting), the analysis and the plots
belong to one benchmark and are each short.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import atomic_write_json

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
CONFIGS = BENCH / "configs"
sys.path.append(str(BENCH / "netsim"))

log = logging.getLogger("time_to_quality")

TARGET_TOLERANCE = 0.02
HEADLINE = ("gpt", 2, "100mbit")
LR_SWEEP = {
    "gpt": {
        "adamw": {"1e-3": 1.926, "2e-3": 1.861, "3e-3": 2.158, "4e-3": 2.237},
        "ranger": {"2e-3": 2.263, "4e-3": 2.090, "8e-3": 1.963, "1.6e-2": 1.875, "3.2e-2": 1.897},
        "note": "also tried: cosine schedule with 40 warmup steps (AdamW 2e-3: 2.033, Ranger "
        "1.6e-2: 2.006), worse than flat_anneal for both",
        "distributed_ranger_k16_2_hosts": {
            "lr 8e-3": 2.189,
            "lr 1.6e-2": 2.023,
            "lr 3.2e-2": 2.196,
            "lr 1.6e-2, outer_lr 1 (plain averaging)": 2.150,
            "lr 1.6e-2, outer Nesterov momentum 0.9, outer_lr 0.7 (DiLoCo-style)": 2.718,
        },
        "post_local_sgd_k16_2_hosts": {"lr 2e-3": 2.147},
    },
    "digits": {
        "adamw": {"1e-3": 0.042, "3e-3": 0.020, "1e-2": 0.016},
        "ranger": {"3e-3": 0.105, "1e-2": 0.027, "3e-2": 0.016},
        "note": "test loss after 384 steps (before the budget was cut to 160)",
    },
}


@dataclass(frozen=True)
class Contender:
    """One way to train: strategy, optimizer and sync options."""

    name: str
    strategy: str | None  # None: a single process
    optimizer: str
    sync_every: int = 0
    overlap: bool = False
    eager: bool = False
    """With ``overlap``: ``[distributed] eager`` (the rows measured before it existed: false)."""
    comm_dtype: str = "fp32"
    extra: tuple[str, ...] = ()
    """More ``--key=value`` overrides, appended last (e.g. the outer optimizer's settings)."""

    def overrides(self, lr: float) -> list[str]:
        out = [f"--optim.name={self.optimizer}", f"--optim.lr={lr}"]
        if self.optimizer == "adamw":  # torch's defaults; Ranger keeps its own (0.95, 0.999), 1e-5
            out += ["--optim.betas=[0.9, 0.999]", "--optim.eps=1e-8"]
        if self.strategy is None:
            return out + list(self.extra)
        out.append(f"--distributed.strategy={self.strategy}")
        if self.strategy == "lookahead":
            out.append(f"--optim.k={self.sync_every}")  # Ranger's k; sync_every defaults to it
        elif self.strategy == "post_local_sgd":
            out.append(f"--distributed.sync_every={self.sync_every}")
        if self.overlap:
            out.append("--distributed.overlap=true")
            out.append(f"--distributed.eager={str(self.eager).lower()}")
        if self.comm_dtype != "fp32":
            out.append(f"--distributed.comm_dtype={self.comm_dtype}")
        return out + list(self.extra)


def _contenders() -> dict[str, Contender]:
    out = [
        Contender("ddp_adamw", "ddp", "adamw"),
        Contender("ddp_ranger", "ddp", "ranger"),
        Contender("post_local_sgd_k16", "post_local_sgd", "adamw", sync_every=16),
    ]
    for k in (8, 16, 32):
        out += [
            Contender(f"ranger_k{k}", "lookahead", "ranger", sync_every=k),
            Contender(f"ranger_k{k}_overlap", "lookahead", "ranger", sync_every=k, overlap=True),
            Contender(f"ranger_k{k}_bf16", "lookahead", "ranger", sync_every=k, comm_dtype="bf16"),
        ]
    out.append(Contender("single_ranger", None, "ranger"))
    return {c.name: c for c in out}


CONTENDERS = _contenders()
DISTRIBUTED = [n for n, c in CONTENDERS.items() if c.strategy is not None]


@dataclass(frozen=True)
class Workload:
    """A model and dataset (a TOML config) with the learning rate of each optimizer."""

    name: str
    config: Path
    lr: dict[str, float]
    what: str
    quick: tuple[str, ...] = ()


WORKLOADS = {
    "gpt": Workload(
        "gpt",
        CONFIGS / "ttq_gpt.toml",
        {"adamw": 2e-3, "ranger": 1.6e-2},
        "byte-level GPT, 2 layers x 128, context 64, ~0.45M parameters, global batch 32, "
        "400 steps, Python stdlib sources",
        (
            "--model.args.n_layer=1",
            "--model.args.n_embd=32",
            "--data.seq_len=32",
            "--train.steps=16",
            "--train.eval_every=8",
            "--train.eval_batches=1",
        ),
    ),
    "digits": Workload(
        "digits",
        CONFIGS / "ttq_digits.toml",
        {"adamw": 1e-2, "ranger": 3e-2},
        "digits CNN (channels 32, BatchNorm), 57K parameters, global batch 64, 160 steps; "
        "loss on the test split",
        ("--train.steps=16", "--train.eval_every=8"),
    ),
}


@dataclass(frozen=True)
class Cell:
    """One (workload, hosts, rate) setting and the contenders run in it."""

    workload: str
    hosts: int
    rate: str | None
    contenders: tuple[str, ...]
    repeat: tuple[str, ...] = ()
    """Contenders run a second time at the end of the cell: the spread of their times is the
    timing noise of this machine at that moment."""

    @property
    def key(self) -> str:
        return f"{self.workload}-{self.hosts}h-{self.rate or 'nolimit'}"


FULL_CELLS = (
    # every contender at the headline cell; a documented subset elsewhere (the budget: a DDP run
    # at 20 Mbit/s alone takes ~5 min); the unlimited cells are the reference for DDP's comm share
    Cell("gpt", 2, "100mbit", tuple(DISTRIBUTED), repeat=("ddp_adamw", "ranger_k16")),
    Cell("gpt", 2, None, ("ddp_adamw", "ddp_ranger", "ranger_k16")),
    Cell("gpt", 2, "1gbit", ("ddp_adamw", "ddp_ranger", "ranger_k16")),
    Cell("gpt", 2, "20mbit", ("ddp_adamw", "ranger_k16", "ranger_k32_bf16")),
    Cell("gpt", 4, "100mbit", ("ddp_adamw", "post_local_sgd_k16", "ranger_k16", "ranger_k32")),
    Cell("gpt", 4, None, ("ddp_adamw",)),
    Cell(
        "digits",
        2,
        "100mbit",
        ("ddp_adamw", "ddp_ranger", "post_local_sgd_k16", "ranger_k8", "ranger_k16", "ranger_k32"),
    ),
    Cell("digits", 2, None, ("ddp_adamw", "ddp_ranger")),
)
QUICK_CELLS = (Cell("gpt", 2, "100mbit", ("ddp_adamw", "post_local_sgd_k16", "ranger_k8")),)


# ---------------------------------------------------------------------------------- launching
@dataclass
class Launch:
    """What running one contender produced, before analysis."""

    ok: bool
    error: str = ""
    wall_s: float = 0.0
    others_cpu_share: float | None = None
    wire_tx_bytes_per_host: float | None = None


class CpuMeter:
    """CPU seconds used machine-wide (``/proc/stat``) and by our children (rusage) over a span."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self.t0, self.busy0, self.own0 = self._read()

    def _read(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(v) - v[3] - v[4]  # everything but idle and iowait
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.monotonic(), busy / self.hz, ru.ru_utime + ru.ru_stime

    def others_share(self) -> float:
        t1, busy1, own1 = self._read()
        others = max(0.0, (busy1 - self.busy0) - (own1 - self.own0))
        return others / max(self.cpus * (t1 - self.t0), 1e-9)


def _tx_bytes(cluster: Any) -> list[int]:
    out = []
    for host in cluster.hosts:
        path = f"/sys/class/net/{host.ifname}/statistics/tx_bytes"
        res = cluster.run(["cat", path], host=host.index, timeout_s=30)
        out.append(int(res.stdout.strip()) if res.ok else -1)
    return out


def launch(
    train_args: list[str],
    *,
    hosts: int,
    cluster: Any,
    env: dict[str, str],
    log_dir: Path,
    timeout_s: float,
) -> Launch:
    """Run ``rangerdl train TRAIN_ARGS``: one process, in the netsim cluster, or plain torchrun."""
    target = ["-m", "rangerdl", "train", *train_args]
    log_dir.mkdir(parents=True, exist_ok=True)
    meter = CpuMeter()
    t0 = time.monotonic()
    tx: list[int] = []
    if cluster is not None:
        tx = _tx_bytes(cluster)
        results = cluster.torchrun(target, env=env, timeout_s=timeout_s, log_dir=log_dir)
        failed = [r for r in results if not r.ok]
        error = ""
        if failed:
            r = failed[0]
            error = f"host {r.host} rc {r.returncode} killed {r.killed}: {r.stderr[-2000:]}"
        wall = time.monotonic() - t0
        share = meter.others_share()
        after = _tx_bytes(cluster)
        wire = sum(b - a for a, b in zip(tx, after, strict=True)) / len(tx)
        return Launch(not failed, error, wall, share, wire)
    argv = [sys.executable, *target]
    if hosts > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        argv += [f"--nproc-per-node={hosts}", *target]
    with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
        try:
            proc = subprocess.run(
                argv,
                env={**os.environ, **env},
                stdout=out,
                stderr=err,
                timeout=timeout_s,
                cwd=REPO,
                check=False,
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.monotonic() - t0
    share = meter.others_share()
    if rc == 0:
        return Launch(True, "", wall, share)
    tail = (log_dir / "stderr").read_text(errors="replace")[-2000:]
    return Launch(False, f"rc {rc}: {tail}", wall, share)


def reproduce_command(
    cfg: Path, args: list[str], hosts: int, rate: str | None, netsim: bool
) -> str:
    """The command that reruns one contender (run folder under ./runs)."""
    train = ["-m", "rangerdl", "train", os.path.relpath(cfg, REPO), *args]
    if hosts == 1:
        return shlex.join(["python", *train])
    if netsim:
        pre = ["python", "benchmarks/netsim/netsim.py", "torchrun", f"--hosts={hosts}"]
        return shlex.join([*pre, f"--rate={rate or 'none'}", "--", *train])
    return shlex.join(["torchrun", "--standalone", f"--nproc-per-node={hosts}", *train[1:]])


# ---------------------------------------------------------------------------------- analysis
def read_run(run_dir: Path) -> dict[str, Any]:
    """Validation curve ``[step, train seconds, loss]`` and final numbers of one run folder."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    summary = json.loads((run_dir / "summary.json").read_text())
    times = {r["step"]: r["time/train_s"] for r in rows if "time/train_s" in r}
    curve = [[r["step"], times[r["step"]], r["val/loss"]] for r in rows if "val/loss" in r]
    # digits has no val split: its periodic val/ ran on the test split, reported last as test/
    final = summary.get("val/loss", summary.get("test/loss"))
    if final is not None and (not curve or curve[-1][0] != summary["step"]):
        curve.append([summary["step"], summary["train_time_s"], final])
    return {
        "curve": curve,
        "final_val_loss": final,
        "steps": summary["step"],
        "train_time_s": summary["train_time_s"],
        "bytes_per_rank_counted": summary.get("comm/bytes"),
        "bytes_at_step_1": next((r.get("comm/bytes") for r in rows if r["step"] == 1), None),
        "syncs": summary.get("comm/syncs"),
        "comm_time_s": summary.get("comm/time_s"),
    }


def time_to_target(curve: list[list[float]], target: float) -> float | None:
    """First time the loss is <= target, interpolated linearly between evaluations."""
    prev: list[float] | None = None
    for point in curve:
        _, t, loss = point
        if loss <= target:
            if prev is None:
                return t
            _, t0, l0 = prev
            return t0 + (l0 - target) / (l0 - loss) * (t - t0)
        prev = point
    return None


def analyse(cells: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> None:
    """Fill targets, times to target, ratios against ``ddp_adamw`` and communication shares."""
    unlimited = {
        (c["workload"], c["hosts"], r["contender"]): r["train_time_s"]
        for c in cells
        if c["rate"] is None
        for r in c["rows"]
        if r.get("ok") and not r.get("repeat")
    }
    for row in [r for c in cells for r in c["rows"]] + list(references.values()):
        # comm/bytes is training traffic for every strategy; rangerdl logs the one-time broadcast
        # of rank 0's weights apart, as comm/broadcast_bytes
        row["bytes_per_rank"] = row.get("bytes_per_rank_counted")
    for cell in cells:
        base = next(
            (
                r
                for r in cell["rows"]
                if r["contender"] == "ddp_adamw" and r["ok"] and not r.get("repeat")
            ),
            None,
        )
        cell["target_val_loss"] = base["final_val_loss"] if base else None
        ref = references.get(cell["workload"])
        rows = cell["rows"] + ([ref] if ref and ref.get("ok") else [])
        cell["single_reference"] = None
        for row in rows:
            out = _row_analysis(row, cell, base, unlimited)
            if row is ref:
                cell["single_reference"] = {**row, **out}
            else:
                row.update(out)


def _row_analysis(
    row: dict[str, Any],
    cell: dict[str, Any],
    base: dict[str, Any] | None,
    unlimited: dict[tuple[str, int, str], float],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not row.get("ok"):
        return out
    strategy = CONTENDERS[row["contender"]].strategy
    target = cell["target_val_loss"]
    if target is not None:
        out["time_to_target_s"] = time_to_target(row["curve"], target)
        out["time_to_target_2pct_s"] = time_to_target(row["curve"], target * (1 + TARGET_TOLERANCE))
        out["final_vs_target"] = row["final_val_loss"] / target - 1
    if base is not None:
        # the other way round: DDP AdamW's time to this contender's final loss, against this
        # contender's own time to it (the speedup at the quality the contender does reach)
        own = row["final_val_loss"]
        t_ddp, t_own = time_to_target(base["curve"], own), time_to_target(row["curve"], own)
        out["ddp_time_to_final_s"] = t_ddp
        out["speedup_at_final"] = t_ddp / t_own if t_ddp is not None and t_own else None
        t2 = out.get("time_to_target_2pct_s")
        out["time_to_target_2pct_vs_ddp"] = t2 / base["train_time_s"] if t2 is not None else None
        out["train_time_vs_ddp"] = row["train_time_s"] / base["train_time_s"]
        if row.get("bytes_per_rank") and base.get("bytes_per_rank"):
            out["bytes_reduction_vs_ddp"] = base["bytes_per_rank"] / row["bytes_per_rank"]
    t_free = unlimited.get((cell["workload"], cell["hosts"], row["contender"]))
    if cell["rate"] is not None and t_free is not None:
        out["comm_share_vs_unlimited"] = 1 - t_free / row["train_time_s"]
    if strategy in ("lookahead", "post_local_sgd") and row.get("comm_time_s") is not None:
        out["comm_share"] = row["comm_time_s"] / row["train_time_s"]
        out["comm_share_method"] = "comm/time_s / train_time_s (blocking collectives)"
    elif strategy == "ddp":
        out["comm_share"] = out.get("comm_share_vs_unlimited")
        out["comm_share_method"] = (
            "1 - T(no limit)/T, same contender and hosts"
            if "comm_share_vs_unlimited" in out
            else ("reference (no limit)" if cell["rate"] is None else "no unlimited run")
        )
    return out


def headline(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline target at (gpt, 2 hosts, 100 Mbit/s): time <= 1/3 of DDP's, bytes >= k x fewer."""
    cell = next((c for c in cells if (c["workload"], c["hosts"], c["rate"]) == HEADLINE), None)
    if cell is None or cell["target_val_loss"] is None:
        return {"cell": "-".join(map(str, HEADLINE)), "evaluated": False}
    checks = []
    for row in cell["rows"]:
        c = CONTENDERS[row["contender"]]
        if c.strategy != "lookahead" or not row.get("ok"):
            continue
        ratio = row.get("time_to_target_2pct_vs_ddp")
        fewer = row.get("bytes_reduction_vs_ddp")
        checks.append(
            {
                "contender": row["contender"] + (" (repeat)" if row.get("repeat") else ""),
                "k": c.sync_every,
                "reached_within_2pct": ratio is not None,
                "time_ratio_vs_ddp": ratio,
                "time_ok": ratio is not None and ratio <= 1 / 3,
                "bytes_reduction": fewer,
                "bytes_ok": fewer is not None and fewer >= c.sync_every,
                "final_vs_target": row.get("final_vs_target"),
            }
        )
    met = [x["contender"] for x in checks if x["time_ok"] and x["bytes_ok"]]
    return {
        "cell": cell["key"],
        "evaluated": True,
        "target_val_loss": cell["target_val_loss"],
        "criterion": "val loss <= 1.02 x DDP AdamW's final, in <= 1/3 of DDP AdamW's training "
        "time, with >= k x fewer bytes per rank",
        "met_by": met,
        "checks": checks,
    }


# ---------------------------------------------------------------------------------- running
@dataclass
class Suite:
    workdir: Path
    netsim: bool
    quick: bool
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)

    def train_args(self, w: Workload, c: Contender, name: str, hosts: int) -> list[str]:
        args = [*c.overrides(w.lr[c.optimizer]), "--train.threads=1", f"--run.name={name}"]
        return args + (list(w.quick) if self.quick else [])

    def run(
        self, w: Workload, c: Contender, hosts: int, rate: str | None, cluster: Any, tag: str
    ) -> dict[str, Any]:
        """Run one contender; its row (command, outcome, curve, counts)."""
        name = f"{tag}-{c.name}"
        args = self.train_args(w, c, name, hosts)
        run_dir = self.workdir / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = reproduce_command(w.config, args, hosts, rate, self.netsim)
        argv = [str(w.config), *args, f"--run.dir={self.workdir / 'runs'}"]
        print(f"  {c.name:<22} ", end="", flush=True)
        res = launch(
            argv,
            hosts=hosts,
            cluster=cluster,
            env=self.env,
            log_dir=self.workdir / "logs" / name,
            timeout_s=self.timeout_s,
        )
        row: dict[str, Any] = {"contender": c.name, "command": command, "ok": res.ok}
        row |= {"wall_s": res.wall_s, "others_cpu_share": res.others_cpu_share}
        row["wire_tx_bytes_per_host"] = res.wire_tx_bytes_per_host
        if res.ok:
            try:
                row |= read_run(run_dir)
            except (OSError, KeyError, ValueError) as exc:
                row |= {"ok": False, "error": f"unreadable run folder {run_dir}: {exc!r}"}
        else:
            row["error"] = res.error
        if row["ok"]:
            print(
                f"val {row['final_val_loss']:.4f}  train {row['train_time_s']:7.1f} s  "
                f"others' CPU {100 * (res.others_cpu_share or 0):3.0f}%",
                flush=True,
            )
        else:
            print(f"FAILED: {row['error'][-300:]}", flush=True)
        return row

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        w = WORKLOADS[cell.workload]
        key = cell.key if self.netsim else f"{cell.workload}-{cell.hosts}h-loopback"
        print(f"{key}: {', '.join(cell.contenders)}", flush=True)
        cluster: Any = None
        if self.netsim:
            from netsim import Cluster

            cluster = Cluster(num_hosts=cell.hosts, rate=cell.rate).start()
        try:
            rows = [
                self.run(w, CONTENDERS[n], cell.hosts, cell.rate, cluster, key)
                for n in cell.contenders
            ]
            repeats = []
            for n in cell.repeat:
                again = self.run(w, CONTENDERS[n], cell.hosts, cell.rate, cluster, key + "-r")
                again["repeat"] = True
                first = next(r for r in rows if r["contender"] == n)
                times = [r.get("train_time_s") for r in (first, again)]
                repeats.append({"contender": n, "train_time_s": times})
                rows.append(again)
        finally:
            if cluster is not None:
                cluster.close()
        return {
            "key": key,
            "workload": cell.workload,
            "hosts": cell.hosts,
            "rate": cell.rate if self.netsim else None,
            "launcher": "netsim" if self.netsim else "torchrun --standalone (loopback)",
            "rows": rows,
            "repeats": repeats,
        }


def prepare_data(workdir: Path, quick: bool, workloads: set[str]) -> None:
    """Prepare the built-in datasets once, before any host starts (not inside timed runs)."""
    os.environ["RANGERDL_CACHE"] = str(workdir / "cache")
    from rangerdl.train.config import load_config
    from rangerdl.train.data import open_data
    from rangerdl.train.runtime import Runtime

    for name in sorted(workloads):
        w = WORKLOADS[name]
        cfg = load_config(w.config, list(w.quick) if quick else None)
        open_data(cfg.data, Runtime(0, 1, 0, __import__("torch").device("cpu"), None))


def _line_style(name: str) -> dict[str, Any]:
    """Colour by family (and k), line style by variant (fp32 solid, overlap dashed, bf16 dotted)."""
    c = CONTENDERS[name]
    if c.strategy == "ddp":
        return {"color": "black" if c.optimizer == "adamw" else "grey", "lw": 2.0, "marker": "s"}
    if c.strategy == "post_local_sgd":
        return {"color": "tab:purple", "lw": 1.5, "marker": "^"}
    if c.strategy is None:
        return {"color": "tab:red", "lw": 1.5, "marker": "D"}
    colour = {8: "tab:blue", 16: "tab:orange", 32: "tab:green"}.get(c.sync_every, "tab:brown")
    ls = "--" if c.overlap else (":" if c.comm_dtype != "fp32" else "-")
    return {"color": colour, "ls": ls, "lw": 1.3, "marker": "o"}


def plot(cells: list[dict[str, Any]], out: Path, only: str | None = None) -> None:
    """Validation loss vs training wall time, one line per contender; one panel per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [c for c in cells if only is None or c["key"] == only]
    if not chosen:
        return
    cols = min(2, len(chosen))
    nrows = -(-len(chosen) // cols)
    size = (8 * cols, 5.5 * nrows) if only else (7 * cols, 4.5 * nrows)
    fig, axes = plt.subplots(nrows, cols, figsize=size, squeeze=False)
    for ax, cell in zip(axes.flat, chosen, strict=False):
        rows = [r for r in cell["rows"] if r.get("ok") and not r.get("repeat")]
        if cell.get("single_reference"):
            rows.append(cell["single_reference"])
        for row in rows:
            _, t, loss = zip(*row["curve"], strict=True)
            ax.plot(t, loss, ms=2.5, label=row["contender"], **_line_style(row["contender"]))
        if cell.get("target_val_loss"):
            tgt = cell["target_val_loss"]
            ax.axhline(tgt, color="k", lw=0.7, ls="-.", label="target (DDP AdamW final)")
            ax.axhline(tgt * (1 + TARGET_TOLERANCE), color="grey", lw=0.7, ls="-.", label="+2%")
        ax.set_title(f"{cell['key']} ({cell['launcher'].split()[0]})")
        ax.set_xlabel("training wall time (s), rank 0")
        ax.set_ylabel("validation loss")
        losses = [p[2] for r in rows for p in r["curve"]]
        if losses and cell.get("target_val_loss"):  # the approach to the target, not the start
            finals = [r["curve"][-1][2] for r in rows]
            top = min(max(losses), max(1.6 * cell["target_val_loss"], 1.3 * max(finals)))
            ax.set_ylim(0.97 * min(losses), top + 0.03 * (top - min(losses)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, one cell")
    parser.add_argument(
        "--no-netsim",
        action="store_true",
        help="plain torchrun --standalone on loopback (no rate limit); the default without root",
    )
    parser.add_argument("--cells", nargs="+", help="run only these cells (keys as printed)")
    parser.add_argument(
        "--contenders", nargs="+", choices=list(CONTENDERS), help="run only these contenders"
    )
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="per run")
    parser.add_argument("--workdir", type=Path, help="run folders and logs (default: temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "time_to_quality.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from netsim import available

    ok, why = available()
    use_netsim = ok and not args.no_netsim
    if not use_netsim:
        print(f"netsim not used ({'--no-netsim' if args.no_netsim else why}): no rate limit")
    cells = list(QUICK_CELLS if args.quick else FULL_CELLS)
    if args.cells:
        cells = [c for c in cells if c.key in args.cells]
    if args.contenders:
        keep = set(args.contenders)
        cells = [
            Cell(
                c.workload,
                c.hosts,
                c.rate,
                tuple(n for n in c.contenders if n in keep),
                tuple(n for n in c.repeat if n in keep),
            )
            for c in cells
        ]
    if not use_netsim:  # without netsim every rate is loopback: one cell per (workload, hosts)
        unique: dict[tuple[str, int], Cell] = {}
        for c in cells:
            unique.setdefault((c.workload, c.hosts), c)
        cells = list(unique.values())
    command = shlex.join(["python", "benchmarks/time_to_quality.py", *sys.argv[1:]])

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-") as tmp:
        workdir = args.workdir or Path(tmp)
        prepare_data(workdir, args.quick, {c.workload for c in cells})
        env = {"RANGERDL_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}
        suite = Suite(workdir, use_netsim, args.quick, args.timeout_s, env)
        results = [suite.run_cell(cell) for cell in cells]
        references = {}
        single = not args.contenders or "single_ranger" in args.contenders
        for name in sorted({c.workload for c in cells} if single else ()):
            print(f"{name}-1h (single process)", flush=True)
            references[name] = suite.run(
                WORKLOADS[name], CONTENDERS["single_ranger"], 1, None, None, f"{name}-1h"
            )
    analyse(results, references)
    summary = headline(results)
    total_s = time.monotonic() - t_start
    payload = {
        "what": "time to a target validation loss on simulated slow networks",
        "command": command,
        "quick": args.quick,
        "netsim": use_netsim,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "definitions": _definitions(),
        "workloads": {
            n: {"what": w.what, "config": os.path.relpath(w.config, REPO), "lr": w.lr}
            for n, w in WORKLOADS.items()
            if any(c["workload"] == n for c in results)
        },
        "contenders": {n: vars(c) for n, c in CONTENDERS.items()},
        "lr_sweep": LR_SWEEP,
        "headline": summary,
        "total_s": total_s,
        "cells": results,
        "single_process": references,
    }
    atomic_write_json(args.out, payload)
    png = args.out.with_suffix(".png")
    head_key = "{}-{}h-{}".format(*HEADLINE)
    plot(results, png, only=head_key if any(c["key"] == head_key for c in results) else None)
    plot(results, args.out.with_name(args.out.stem + "_cells.png"))
    from report import ttq_tables

    print()
    print(ttq_tables(payload))
    print(f"\nwrote {args.out}, {png} ({total_s:.0f} s)")
    failed = [r["contender"] for c in results for r in c["rows"] if not r["ok"]]
    failed += [n for n, r in references.items() if not r["ok"]]
    if failed:
        print(f"FAILED runs: {', '.join(failed)}")
    return 1 if failed else 0


def _definitions() -> dict[str, str]:
    doc = __doc__ or ""
    start = doc.index("Definitions")
    return {"text": doc[start : doc.index("Learning rates")].strip()}


if __name__ == "__main__":
    sys.exit(main())
