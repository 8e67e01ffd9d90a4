"""Launch torchft's DiLoCo (``torchft_train.py``): the Lighthouse and one replica group per host,
on loopback or one per host of a ``benchmarks/netsim`` cluster.

::

    python benchmarks/peers/launch.py run --hosts 2 -- benchmarks/configs/ttq_gpt.toml \\
        --optim.name=adamw --optim.lr=2e-3 --diloco.sync_every=8 --run.name=diloco
    python benchmarks/peers/launch.py run --hosts 2 --rate 100mbit -- ...   # netsim (root)

Each replica group is a plain process (it serves its own TCPStore: no torchrun). The Lighthouse
(``min_replicas`` = hosts) runs in a small wrapper around group 0's process (``launch.py
lighthouse``), in host 0's namespace and bound to its address under netsim, and ends with it.
Every group is told the address others reach it at (``REPLICA_GROUP_HOST``): in a netsim
namespace the host name resolves to the namespace's own loopback. A group that fails ends the
others after ``PEER_FAILURE_GRACE_S``; at the timeout all are killed (their process groups, and
under netsim everything left in their namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRAINER = HERE / "torchft_train.py"
REPO = HERE.parents[1]
sys.path.append(str(HERE.parent / "netsim"))

from netsim import Result  # noqa: E402

LIGHTHOUSE_PORT = 29510
"""The Lighthouse's port in host 0's namespace under netsim (a fresh namespace: always free)."""
QUORUM_TICK_MS = 20
PEER_FAILURE_GRACE_S = 15.0


def group_env(index: int, count: int, host: str, lighthouse: str) -> dict[str, str]:
    """The environment ``torchft_train.py`` reads for replica group ``index`` of ``count``."""
    return {
        "REPLICA_GROUP_ID": str(index),
        "NUM_REPLICA_GROUPS": str(count),
        "REPLICA_GROUP_HOST": host,
        "TORCHFT_LIGHTHOUSE": f"http://{lighthouse}",
        "RUST_LOG": os.environ.get("RUST_LOG", "warn"),  # torchft's Rust side logs every quorum
    }


def commands(train_args: Sequence[str], hosts: int, lighthouse: str) -> list[list[str]]:
    """One command per replica group; group 0's also serves the Lighthouse at ``lighthouse``."""
    trainer = [sys.executable, str(TRAINER), *train_args]
    serve = [sys.executable, str(Path(__file__).resolve()), "lighthouse", f"--bind={lighthouse}"]
    serve += [f"--min-replicas={hosts}", "--"]
    return [serve + trainer if i == 0 else trainer for i in range(hosts)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_loopback(
    train_args: Sequence[str],
    hosts: int,
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path,
    timeout_s: float,
) -> list[Result]:
    """Every replica group on this machine's loopback; results in group order (output also in
    ``log_dir/host<i>.stdout`` and ``.stderr``)."""
    lighthouse = f"127.0.0.1:{_free_port()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    start = time.monotonic()
    ended: dict[int, float] = {}
    killed: dict[int, str] = {}
    try:
        for i, cmd in enumerate(commands(train_args, hosts, lighthouse)):
            host_vars = {"GLOO_SOCKET_IFNAME": "lo", **(env or {})}
            host_vars |= group_env(i, hosts, "127.0.0.1", lighthouse)
            with (
                open(log_dir / f"host{i}.stdout", "wb") as out,
                open(log_dir / f"host{i}.stderr", "wb") as err,
            ):
                procs[i] = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env={**os.environ, **host_vars},
                    cwd=REPO,
                    start_new_session=True,  # a process group of its own: killed as one
                )
        killed = _wait(procs, ended, start + timeout_s)
    finally:
        running = [p for i, p in procs.items() if i not in ended]
        _kill(running)
        ended |= {i: time.monotonic() for i in procs if i not in ended}
    return [
        Result(
            host=i,
            returncode=procs[i].returncode,
            stdout=(log_dir / f"host{i}.stdout").read_text(errors="replace"),
            stderr=(log_dir / f"host{i}.stderr").read_text(errors="replace"),
            elapsed_s=ended[i] - start,
            killed=killed.get(i),
        )
        for i in sorted(procs)
    ]


def _wait(
    procs: Mapping[int, subprocess.Popen[bytes]], ended: dict[int, float], deadline: float
) -> dict[int, str]:
    """Poll until all exit, one fails (the others get ``PEER_FAILURE_GRACE_S``) or the
    deadline; fills ``ended``; returns who is to be killed and why."""
    reason = "timeout"
    while len(ended) < len(procs):
        now = time.monotonic()
        for i, proc in procs.items():
            if i not in ended and proc.poll() is not None:
                ended[i] = now
                if proc.returncode != 0 and now + PEER_FAILURE_GRACE_S < deadline:
                    deadline, reason = now + PEER_FAILURE_GRACE_S, "peer failed"
        if len(ended) < len(procs) and now >= deadline:
            return dict.fromkeys(procs.keys() - ended.keys(), reason)
        time.sleep(0.05)
    return {}


def _kill(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """SIGTERM each process group, SIGKILL what is left after ``grace_s``."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_cluster(
    cluster: Any,
    train_args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path,
    timeout_s: float,
) -> list[Result]:
    """One replica group per host of a started ``netsim.Cluster``, the Lighthouse in host 0's
    namespace at its address; results in host order."""
    hosts = cluster.hosts
    lighthouse = f"{hosts[0].ip}:{LIGHTHOUSE_PORT}"
    host_env = {h.index: group_env(h.index, len(hosts), h.ip, lighthouse) for h in hosts}
    return list(
        cluster.run_all(
            commands(train_args, len(hosts), lighthouse),
            env=env,
            host_env=host_env,
            timeout_s=timeout_s,
            cwd=REPO,
            log_dir=log_dir,
            peer_failure_grace_s=PEER_FAILURE_GRACE_S,
        )
    )


def reproduce_command(train_args: Sequence[str], hosts: int, rate: str | None, netsim: bool) -> str:
    """The command line that reruns a launch (what the benchmark's rows keep)."""
    import shlex

    where = [f"--rate={rate or 'none'}"] if netsim else ["--no-netsim"]
    pre = ["python", "benchmarks/peers/launch.py", "run", f"--hosts={hosts}", *where, "--"]
    return shlex.join([*pre, *train_args])


# ---------------------------------------------------------------------------------- commands
def _serve_lighthouse(args: argparse.Namespace) -> int:
    """``lighthouse``: serve the Lighthouse while the command after ``--`` runs; its exit code."""
    from torchft._torchft import LighthouseServer

    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    server = LighthouseServer(
        bind=args.bind, min_replicas=args.min_replicas, quorum_tick_ms=QUORUM_TICK_MS
    )
    try:
        return subprocess.call(cmd)
    finally:
        server.shutdown()


def _run(args: argparse.Namespace) -> int:
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    log_dir = Path(args.log_dir or f"runs/torchft-logs-{os.getpid()}")
    if args.no_netsim:
        results = run_loopback(train_args, args.hosts, log_dir=log_dir, timeout_s=args.timeout_s)
    else:
        from netsim import Cluster

        with Cluster(num_hosts=args.hosts, rate=args.rate) as cluster:
            results = run_cluster(cluster, train_args, log_dir=log_dir, timeout_s=args.timeout_s)
    for r in results:
        status = f"rc {r.returncode}" + (f", killed: {r.killed}" if r.killed else "")
        print(f"===== replica group {r.host} ({status}, {r.elapsed_s:.1f} s) =====")
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr[-4000:])
    return 0 if all(r.ok for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="the Lighthouse and --hosts replica groups")
    r.add_argument("--hosts", type=int, default=2)
    r.add_argument("--rate", default="100mbit", help="netsim link rate ('none': no limit)")
    r.add_argument("--no-netsim", action="store_true", help="loopback instead of netsim")
    r.add_argument("--timeout-s", type=float, default=3600.0)
    r.add_argument("--log-dir", help="each group's stdout and stderr (default: under runs/)")
    r.add_argument("train_args", nargs=argparse.REMAINDER, help="-- CONFIG --key=value ...")
    s = sub.add_parser("lighthouse", help="serve the Lighthouse while a command runs")
    s.add_argument("--bind", required=True, help="HOST:PORT")
    s.add_argument("--min-replicas", type=int, required=True)
    s.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return _serve_lighthouse(args) if args.what == "lighthouse" else _run(args)


if __name__ == "__main__":
    sys.exit(main())
