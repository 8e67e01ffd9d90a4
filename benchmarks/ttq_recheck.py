"""Rerun a few runs of the time-to-quality protocol, to check the machine against an earlier run.

The protocol's JSON keeps runs across invocations (a cell rerun without ``--redo`` reuses the runs it
already has), and this machine is shared: its speed drifts by several percent between days.
When new rows are added to a cell whose DDP runs are older, rerun one DDP run and one local run
that already exist, the same way (same entry, tuned lr, seed, budget, cell), into a side JSON, and
compare their training times with the committed ones::

    python benchmarks/ttq_recheck.py --cell gpt-2h-100mbit \\
        --runs ddp_adamw:1024 ranger_k8_bf16:1280 --out benchmarks/results/ttq_recheck.json

Prints, per run, the training time now and in ``ttq_protocol.json`` (same key) and their ratio.
Needs root (netsim), like ``ttq_protocol.py run``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import ttq_protocol as ttq
from common import atomic_write_json
from time_to_quality import prepare_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cell", required=True, choices=[c.key for c in ttq.CELLS])
    parser.add_argument("--runs", nargs="+", required=True, help="ENTRY:STEPS, seed 0")
    parser.add_argument("--out", type=Path, default=ttq.RESULTS / "ttq_recheck.json")
    args = parser.parse_args(argv)
    spec = next(c for c in ttq.CELLS if c.key == args.cell)
    committed = ttq.load(ttq.OUT)
    wanted = []
    for item in args.runs:
        name, _, steps = item.partition(":")
        if name not in ttq.ENTRIES or not steps.isdigit():
            parser.error(f"--runs: {item!r} is not ENTRY:STEPS with a known entry")
        lr = ttq.tuned_lr(committed, spec.workload, 2, name)
        if lr is None:
            parser.error(f"--runs: {name} has no tuning runs in {ttq.OUT}")
        wanted.append((name, int(steps), lr))
    rows = []
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-recheck-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, False, {spec.workload})
        with ttq.Runner(workdir, spec.workload, spec.hosts, spec.rate) as runner:
            for name, steps, lr in wanted:
                every = ttq.EVAL_EVERY[spec.workload]
                row = runner.run(ttq.ENTRIES[name], lr, 0, steps, "run", every)
                key = ttq._key(row)
                before = [r for r in committed["runs"] if ttq._key(r) == key and r.get("ok")]
                then = before[-1]["train_time_s"] if before else None
                now = row["train_time_s"] if row.get("ok") else None
                rows.append({"run": row, "committed_train_time_s": then, "train_time_s": now})
                ratio = f"{now / then:.3f}" if now and then else "-"
                print(f"{name} {steps} steps: {now} s now, {then} s committed, ratio {ratio}")
    atomic_write_json(
        args.out,
        {
            "what": "reruns of committed time-to-quality runs: the machine then and now",
            "command": shlex.join(["python", "benchmarks/ttq_recheck.py", *sys.argv[1:]]),
            "machine": {"platform": platform.platform()},
            "cell": args.cell,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
