"""``rangerdl plan`` and ``rangerdl sweep``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="communication cost per step and per run for DDP, PostLocalSGD and distributed Ranger",
        description="Predict compute time, communication time and bytes per rank, per step and "
        "per run, from a ring all-reduce model with latency and bandwidth terms (formulas: "
        "rangerdl/workflow/plan.py). Times the configured model's steps here unless --params "
        "and --step-time are given. Override config values with --table.key=value.",
    )
    p.add_argument("config", nargs="?", type=Path, help="TOML config (default: the digits CNN)")
    p.add_argument("--workers", type=int, required=True, help="number of workers (W >= 2)")
    p.add_argument(
        "--bandwidth", required=True, help="per-link bandwidth: 100mbit, 10gbit, 1.25GB/s"
    )
    p.add_argument("--latency", default="0.1ms", help="per-message latency alpha (default 0.1ms)")
    p.add_argument("--params", help="parameter count (1.3B, 350M) instead of the config's model")
    p.add_argument("--step-time", help="compute per worker and step (0.4s) instead of timing here")
    p.add_argument("--steps", type=int, help="steps per run (default: [train] steps)")
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        help="sync periods to tabulate (default: 4 8 16 32 64 128 and the config's sync_every)",
    )
    p.add_argument(
        "--max-share",
        type=float,
        default=0.1,
        help="communication share for the smallest-k line (default 0.1)",
    )
    p.add_argument(
        "--efficiency",
        type=float,
        help="payload share of wire bytes (default 0.94: TCP over Ethernet)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    p.set_defaults(run=_plan, accepts_extra=True)

    from rangerdl.workflow.sweep import register_sweep

    register_sweep(sub)


def _plan(args: argparse.Namespace, extra: list[str]) -> int:
    from rangerdl._fileio import atomic_write_text
    from rangerdl.distributed.cost import ETHERNET_EFFICIENCY, Link
    from rangerdl.train.config import load_config
    from rangerdl.units import parse_bandwidth, parse_count, parse_duration
    from rangerdl.workflow.plan import DEFAULT_KS, StepTimes, check_option, format_plan, make_plan

    def option(name: str, text: str, parse: Callable[[str], Any]) -> Any:
        try:
            value = parse(text)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return check_option(name, value)

    cfg = load_config(args.config, extra)
    link = Link(
        option("--bandwidth", args.bandwidth, parse_bandwidth),
        option("--latency", args.latency, parse_duration),
        check_option(
            "--efficiency", ETHERNET_EFFICIENCY if args.efficiency is None else args.efficiency
        ),
    )
    if (args.params is None) != (args.step_time is None):
        raise ValueError(
            "give --params and --step-time together (or neither: time the config here)"
        )
    caution = None
    if args.params is not None:
        numel, buffers = option("--params", args.params, parse_count), 0
        times, source = (
            StepTimes.from_total(option("--step-time", args.step_time, parse_duration)),
            "given: --step-time, backward 2/3",
        )
    else:
        from rangerdl.workflow.plan import count_and_time

        numel, buffers, times, caution = count_and_time(cfg, args.workers)
        source = f"timed here: {cfg.model.name}, {cfg.data.batch_size // args.workers} samples per worker"
    k_cfg = cfg.distributed.sync_every or cfg.optim.k
    ks = tuple(args.k) if args.k else (*DEFAULT_KS, k_cfg)
    plan = make_plan(
        numel=numel,
        times=times,
        world_size=args.workers,
        link=link,
        steps=cfg.train.steps if args.steps is None else args.steps,
        ks=ks,
        plsgd_k=k_cfg,
        max_share=args.max_share,
        buffer_numel=buffers,
        times_source=source,
        block_size=cfg.distributed.block_size,
        topk_density=cfg.distributed.topk_density,
    )
    plan.caution = caution
    print(format_plan(plan))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(plan.to_dict(), indent=2) + "\n")
    return 0
