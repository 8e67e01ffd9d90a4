"""``rangerdl lighthouse``: torchft's Lighthouse, which keeps the quorum of live replica groups."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "lighthouse",
        help="serve torchft's Lighthouse for fault-tolerant distributed Ranger (rangerdl[ft])",
        description="Serve torchft's Lighthouse until SIGINT or SIGTERM: every sync, it forms the "
        "quorum of the replica groups that are alive (rangerdl.distributed.ft). A group that "
        "stops heart-beating for --heartbeat-timeout-ms is left out; a quorum forms once every "
        "member of the last one has joined, or --join-timeout-ms after the first joined with at "
        "least --min-replicas.",
    )
    p.add_argument("--bind", default="[::]:29510", help="HOST:PORT to serve at ([::]:29510)")
    p.add_argument(
        "--min-replicas", type=int, default=1, help="the fewest groups a quorum may have (1)"
    )
    p.add_argument("--join-timeout-ms", type=int, default=10_000, help="(10000)")
    p.add_argument("--heartbeat-timeout-ms", type=int, default=5_000, help="(5000)")
    p.add_argument("--quorum-tick-ms", type=int, default=100, help="(100)")
    p.set_defaults(run=_lighthouse)


def _lighthouse(args: argparse.Namespace, extra: list[str]) -> int:
    from rangerdl.distributed.ft_group import require_torchft

    for name in ("min_replicas", "join_timeout_ms", "heartbeat_timeout_ms", "quorum_tick_ms"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # torchft's Rust side logs every quorum tick at info; keep warnings unless asked (RUST_LOG)
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        require_torchft()
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    from torchft._torchft import LighthouseServer

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = LighthouseServer(
            bind=args.bind,
            min_replicas=args.min_replicas,
            join_timeout_ms=args.join_timeout_ms,
            quorum_tick_ms=args.quorum_tick_ms,
            heartbeat_timeout_ms=args.heartbeat_timeout_ms,
        )
    except Exception as exc:  # the Rust server's bind error (address in use, bad address)
        raise ValueError(f"cannot serve the Lighthouse at {args.bind}: {exc}") from None
    # torchft's address names this machine's host name; the groups reach it at --bind's address
    print(
        f"Lighthouse at {server.address()} (bound to {args.bind}; min replicas "
        f"{args.min_replicas})",
        flush=True,
    )
    try:
        stop.wait()
    finally:
        server.shutdown()
    return 0
