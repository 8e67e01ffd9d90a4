"""``python benchmarks/ttq_protocol.py [--quick] {tune,run,report,recheck}``: the protocol's stages
(see ``ttq/protocol.py``); every stage ends by rewriting the JSON's analysis, its figure and
printing its tables."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import atomic_write_json
from ttq import protocol as p
from ttq import report, runner

QUICK_OUT = Path(tempfile.gettempdir()) / "rangerdl-ttq-quick" / "ttq_protocol.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(p.__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("tune", help="stage 1: equal lr-tuning budget, loopback")
    t.add_argument("--entries", nargs="+", choices=list(p.ENTRIES), default=list(p.ENTRIES))
    t.add_argument("--workload", choices=list(p.B), default="gpt")
    t.add_argument("--hosts", type=int, default=2)
    t.add_argument(
        "--cells",
        nargs="+",
        choices=[c.key for c in p.CELLS],
        help="tune what these cells' contenders need (instead of --entries and --workload)",
    )
    t.add_argument("--redo", action="store_true", help="rerun tuning runs already in the JSON")
    r = sub.add_parser("run", help="stage 2: the cells on the simulated network (root)")
    r.add_argument("--cells", nargs="+", choices=[c.key for c in p.CELLS])
    r.add_argument("--entries", nargs="+", choices=list(p.ENTRIES), help="only these contenders")
    r.add_argument("--redo", action="store_true", help="rerun runs already in the JSON")
    r.add_argument("--tuning", type=Path, help="JSON with the tune runs (default: --out)")
    r.add_argument(
        "--no-netsim",
        action="store_true",
        help="loopback, no rate limit: a smoke test of the stage (the cells' times mean nothing)",
    )
    st = sub.add_parser(
        "seedstudy", help="DDP AdamW with (init seed, data-order seed, lr) apart, loopback"
    )
    st.add_argument("--runs", nargs="+", required=True, help="INIT,DATA,LR e.g. 2,0,0.002")
    st.add_argument("--workload", choices=list(p.B), default="gpt")
    st.add_argument("--redo", action="store_true", help="rerun runs already in the JSON")
    bd = sub.add_parser(
        "bound", help="contenders of a cell with no rate limit: how far the link holds them (root)"
    )
    bd.add_argument("--cell", required=True, choices=[c.key for c in p.CELLS])
    bd.add_argument("--runs", nargs="+", required=True, help="ENTRY:STEPS, every seed")
    bd.add_argument("--redo", action="store_true", help="rerun runs already in the JSON")
    rep = sub.add_parser("report", help="stage 3: tables and figure from the JSON")
    c = sub.add_parser("recheck", help="rerun committed runs: the machine then and now (root)")
    c.add_argument("--cell", required=True, choices=[c.key for c in p.CELLS])
    c.add_argument("--runs", nargs="+", required=True, help="ENTRY:STEPS, seed 0")
    for x in (t, r, st, bd, rep, c):
        x.add_argument(
            "--out",
            type=Path,
            help=f"results JSON (default: {runner.OUT.relative_to(runner.REPO)}; with --quick: "
            f"{QUICK_OUT}, never the committed results)",
        )
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes and budgets")
    return parser


def _recheck_runs(parser: argparse.ArgumentParser, items: list[str]) -> list[tuple[str, int]]:
    wanted = []
    for item in items:
        name, _, steps = item.partition(":")
        if name not in p.ENTRIES or not steps.isdigit():
            parser.error(f"--runs: {item!r} is not ENTRY:STEPS with a known entry")
        wanted.append((name, int(steps)))
    return wanted


def _study_runs(parser: argparse.ArgumentParser, items: list[str]) -> list[tuple[int, int, float]]:
    out = []
    for item in items:
        try:
            init, data, lr = item.split(",")
            out.append((int(init), int(data), float(lr)))
        except ValueError:
            parser.error(f"--runs: {item!r} is not INIT,DATA,LR (two seeds and a learning rate)")
    return out


def _need_netsim() -> None:
    from netsim import available

    ok, why = available()
    if not ok:
        raise SystemExit(f"netsim unavailable ({why}): the cells need the rate limit")


def _describe(payload: dict[str, Any], argv: list[str]) -> None:
    payload |= {
        "protocol": (p.__doc__ or "").split("::")[0].strip(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "constants": {
            "B": p.B,
            "tune_seed": p.TUNE_SEED,
            "tune_factors": p.TUNE_FACTORS,
            "lr_centre": p.LR_CENTRE,
            "seeds": p.SEEDS,
            "rungs": p.RUNGS,
            "targets": p.TARGETS,
        },
        "entries": {n: {"what": e.what, **vars(e.contender)} for n, e in p.ENTRIES.items()},
        "last_command": shlex.join(["python", "benchmarks/ttq_protocol.py", *argv]),
        "command": "python benchmarks/ttq_protocol.py tune; python benchmarks/ttq_protocol.py run",
    }
    if p.QUICK:
        payload["quick"] = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        p.use_quick()
    if args.out is None:
        args.out = QUICK_OUT if args.quick else runner.OUT
    if args.stage == "tune" and args.cells:
        for workload, names in p.tuning_entries(args.cells).items():
            runner.tune(names, workload, 2, args.out, args.redo)
    elif args.stage == "tune":
        runner.tune(args.entries, args.workload, args.hosts, args.out, args.redo)
    elif args.stage == "run":
        if not args.no_netsim:
            _need_netsim()
        for spec in p.CELLS:
            if not args.cells or spec.key in args.cells:
                netsim = not args.no_netsim
                runner.run_cell(spec, args.out, args.redo, args.tuning, netsim, args.entries)
    elif args.stage == "seedstudy":
        runner.seed_study(args.workload, _study_runs(parser, args.runs), args.out, args.redo)
    elif args.stage == "bound":
        _need_netsim()
        spec = next(c for c in p.CELLS if c.key == args.cell)
        runner.bound(spec, _recheck_runs(parser, args.runs), args.out, args.redo)
    elif args.stage == "recheck":
        _need_netsim()
        spec = next(c for c in p.CELLS if c.key == args.cell)
        command = shlex.join(["python", "benchmarks/ttq_protocol.py", *argv])
        runner.recheck(spec, _recheck_runs(parser, args.runs), args.out, command)
    payload = runner.load(args.out)
    _describe(payload, argv)
    payload["cells"] = p.analyse(payload)
    payload["bounds"] = p.bounds(payload, payload["cells"])
    atomic_write_json(args.out, payload)
    if payload["cells"]:
        report.plot(payload, args.out.with_suffix(".png"))
    print(report.tables(payload))
    return 0
