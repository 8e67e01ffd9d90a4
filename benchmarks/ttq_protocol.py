"""Time to DDP's quality, the fair way (issue 10): tuning, equal tokens and a ladder of budgets.

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
   same seed gives the same curve at any rate; only its wall-clock changes).
2. ``run``: per cell, on the simulated network:
   - equal tokens: every contender at B steps (DDP AdamW's budget); seeds ``SEEDS`` for DDP AdamW
     and the headline contenders in the headline cell, seed 0 elsewhere; mean +- sd of the final
     validation loss (slow weights for Lookahead contenders). "Matches DDP" = within DDP AdamW's
     seed spread (mean +- sd), else the relative gap.
   - time to target: target = DDP AdamW's mean final validation loss at B steps. Each local
     contender trains through the ladder ``RUNGS`` (x B steps, rounded up to a multiple of its
     k; fixed in advance; the step budget sizes its LR schedule) in order and stops at the first
     rung whose run reaches the target; its time to target is the first crossing on the training
     wall clock (``time/train_s``, interpolated between evaluations). Longer rungs are not run
     once a rung reaches it (a longer schedule stays at a high LR longer and reaches a given loss
     later); the rungs that were run are all in the JSON.
   - per row: time to target, speedup over DDP (DDP AdamW's mean B-step training time / time to
     target), that speedup as a fraction of the cell's limit (DDP's time at the cell's rate /
     DDP's time with no rate limit: no method beats DDP by more), final loss at equal tokens,
     bytes per rank (``comm/bytes``), share of training time communicating.
3. ``report``: the tables (markdown) and the figure: each contender's curve up to its
   time-to-target rung, with the target line and DDP.

::

    python benchmarks/ttq_protocol.py tune              # ~25 min on 2 cores, loopback
    python benchmarks/ttq_protocol.py run               # needs root (netsim)
    python benchmarks/ttq_protocol.py report
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
B = {"gpt": 1000, "digits": 160}
"""DDP AdamW's step budget per workload: the target is its final loss."""
TUNE_SEED = 100
TUNE_FACTORS = (0.5, 0.7071, 1.0, 1.4142, 2.0)
LR_CENTRE = {"gpt": {"adamw": 2e-3, "ranger": 1.6e-2}, "digits": {"adamw": 1e-2, "ranger": 3e-2}}
SEEDS = (0, 1, 2)
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
    def ranger(name: str, k: int, *extra: str, overlap: bool = False, dtype: str = "fp32") -> Entry:
        c = Contender(name, "lookahead", "ranger", k, overlap=overlap, comm_dtype=dtype, extra=extra)
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

    def __init__(self, workdir: Path, workload: str, hosts: int, rate: str | None) -> None:
        self.workdir, self.workload, self.hosts, self.rate = workdir, workload, hosts, rate
        self.cluster: Any = None
        env = {"RANGERDL_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}
        self.suite = Suite(workdir, rate is not None, False, timeout_s=3600.0, env=env)

    @property
    def cell(self) -> str:
        return f"{self.workload}-{self.hosts}h-{self.rate or 'loopback'}"

    def __enter__(self) -> Runner:
        if self.rate is not None:
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
        budget = (f"--train.steps={steps}", f"--train.eval_every={eval_every}")
        c = replace(entry.contender, extra=(*entry.contender.extra, *budget, f"--run.seed={seed}"))
        w = replace(w, lr={**w.lr, c.optimizer: lr})
        tag = f"{stage}-{self.cell}-lr{lr:.3g}-s{seed}-b{steps}"
        t0 = time.time()
        row = self.suite.run(w, c, self.hosts, self.rate, self.cluster, tag)
        row |= {"stage": stage, "cell": self.cell, "entry": entry.name, "lr": lr, "seed": seed}
        row |= {"steps_budget": steps, "started": t0, "eval_every": eval_every}
        return row


def tune(names: list[str], workload: str, hosts: int, out: Path) -> None:
    """Stage 1: the lr grid of every entry in ``names``, seed TUNE_SEED, B steps, loopback."""
    steps = B[workload]
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-tune-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, False, {workload})
        with Runner(workdir, workload, hosts, None) as runner:
            for name in names:
                e = ENTRIES[name]
                centre = LR_CENTRE[workload][e.contender.optimizer]
                for f in TUNE_FACTORS:
                    lr = float(f"{centre * f:.3g}")
                    row = runner.run(e, lr, TUNE_SEED, steps, "tune", eval_every=steps)
                    save_run(out, row)


def tuned_lr(payload: dict[str, Any], workload: str, hosts: int, name: str) -> float | None:
    """The tuning winner: lowest final val loss among the entry's tune runs."""
    cell = f"{workload}-{hosts}h-loopback"
    runs = [
        r
        for r in payload["runs"]
        if r["stage"] == "tune" and r["cell"] == cell and r["entry"] == name and r.get("ok")
    ]
    return min(runs, key=lambda r: r["final_val_loss"])["lr"] if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("tune", help="stage 1: equal lr-tuning budget, loopback")
    t.add_argument("--entries", nargs="+", choices=list(ENTRIES), default=list(ENTRIES))
    t.add_argument("--workload", choices=list(B), default="gpt")
    t.add_argument("--hosts", type=int, default=2)
    for p in (t,):
        p.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.stage == "tune":
        tune(args.entries, args.workload, args.hosts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
