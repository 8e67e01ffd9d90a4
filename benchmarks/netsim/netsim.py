"""A slow network on one machine: N network namespaces ("hosts") behind a rate-limited bridge.

Everything lives in namespaces this module creates; the root namespace is never modified::

    host i   netns rdl<pid>-<pidns>-<seq>-h<i>   lo, rdlh<i> 10.213.0.<101+i>/24   tbf on egress
                 | veth
    switch   netns rdl<pid>-<pidns>-<seq>-s      rdlp<i> (tbf on egress) in bridge rdlbr0

Each link is limited in both directions with ``tc qdisc replace dev IF root tbf rate R burst B
latency 100ms`` (``netem`` is not available on this kernel), so traffic between two hosts crosses
one limiter per direction on each side. B is 64 KB, or 2 ms worth of R if that is more: with
64 KB at 1 Gbit/s a 10 MB all-reduce between 2 hosts took 0.15 s (about half the rate) against
0.086 s with 256 KB, while below ~250 Mbit/s 64 KB already reaches the rate. Host addresses sort as strings in host order, which makes
torch's c10d rendezvous (it ranks nodes by sorted address) give host i node rank i.

:class:`Cluster` builds the network and launches commands in it, torchrun included; leftovers of a
process that died without tearing down (SIGKILL) are removed by :func:`cleanup`. Needs root, ``ip``
and ``tc``; :func:`available` says whether this machine has them. From the command line::

    python benchmarks/netsim/netsim.py check
    python benchmarks/netsim/netsim.py allreduce --hosts 2 4 --rate none 1gbit 100mbit 20mbit --mbytes 10
    python benchmarks/netsim/netsim.py torchrun --hosts 2 --rate 100mbit -- -m rangerdl train CFG
    python benchmarks/netsim/netsim.py cleanup

The file is over the house length limit: it is one file so that the command line above runs as a
plain script (no package on sys.path needed), and the launcher (timeouts, killing, output), the
namespace life cycle, cleanup and the CLI each stay short.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "rdl"
SUBNET = "10.213.0"
HOST_ADDR_OFFSET = 101  # 10.213.0.101 ...: same length, so string order is host order
MAX_HOSTS = 64
RDZV_PORT = 29400
WORKER = Path(__file__).resolve().parent / "allreduce_worker.py"
RESULTS = Path(__file__).resolve().parent.parent / "results"

_NAME_RE = re.compile(rf"^{PREFIX}(?P<pid>\d+)-(?P<pidns>\d+)-(?P<seq>\d+)-(?P<role>s|h\d+|probe)$")
_RATE_RE = re.compile(
    r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$"
)
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_RATE_UNITS |= {"bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_SEQ = itertools.count()


def parse_rate(rate: str | None) -> float | None:
    """Bits per second of a tc rate such as ``"100mbit"`` (SI units, like tc); None means unlimited."""
    if rate is None or rate.lower() in ("none", "unlimited"):
        return None
    match = _RATE_RE.match(rate.lower())
    if match is None:
        raise ValueError(
            f"rate {rate!r}: expected a number and one of {sorted(_RATE_UNITS)} "
            "(e.g. '100mbit'), or 'none' for unlimited"
        )
    bits = float(match["value"]) * _RATE_UNITS[match["unit"]]
    if bits <= 0:
        raise ValueError(f"rate {rate!r}: must be positive")
    return bits


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _new_name_base() -> str:
    return f"{PREFIX}{os.getpid()}-{_pid_namespace()}-{next(_SEQ)}"


def _cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an ``ip``/``tc``/... command; failures raise with the command and its stderr."""
    proc = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _ip(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _cmd("ip", "-n", namespace, *args, check=check)


def _tc(namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _cmd("tc", "-n", namespace, *args, check=check)


def _tbf(rate: str, burst: str | None, latency: str) -> tuple[str, ...]:
    if burst is None:  # 2 ms of traffic: the bucket must outlast the qdisc's wake-up delay
        bits_per_s = parse_rate(rate)
        assert bits_per_s is not None
        burst = f"{max(64, math.ceil(bits_per_s * 0.002 / 8 / 1024))}kb"  # tc: kb = 1024 bytes
    return ("tbf", "rate", rate, "burst", burst, "latency", latency)


def _host_ip(index: int) -> str:
    return f"{SUBNET}.{HOST_ADDR_OFFSET + index}"


def _namespaces() -> list[str]:
    out = _cmd("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_processes(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (one of ours, so all of them are ours)."""
    for pid in map(int, _cmd("ip", "netns", "pids", namespace, check=False).stdout.split()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _delete_namespace(namespace: str) -> None:
    _kill_processes(namespace)
    _cmd("ip", "netns", "del", namespace, check=False)


@functools.cache
def available() -> tuple[bool, str]:
    """Whether this machine can build a cluster, and if not, why (root, ``ip``, ``tc``, tbf)."""
    if not sys.platform.startswith("linux"):
        return False, f"needs Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return False, f"needs root to create network namespaces (euid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"needs `{tool}` (iproute2) on PATH"
    probe = f"{_new_name_base()}-probe"
    try:
        _cmd("ip", "netns", "add", probe)
    except RuntimeError as e:
        return False, f"cannot create a network namespace: {e}"
    try:
        _ip(probe, "link", "add", "rdlbr0", "type", "bridge")
        _ip(probe, "link", "add", "rdla", "type", "veth", "peer", "name", "rdlb")
        _tc(probe, "qdisc", "replace", "dev", "rdla", "root", *_tbf("1mbit", "64kb", "100ms"))
        _cmd("ip", "netns", "exec", probe, "true")
    except RuntimeError as e:
        return False, f"bridge/veth/tbf not supported: {e}"
    finally:
        _delete_namespace(probe)
    return True, "root, ip, tc, bridge, veth and tbf available"


@dataclass(frozen=True)
class Host:
    """One simulated host: its namespace, interface and address."""

    index: int
    namespace: str
    ifname: str
    ip: str


@dataclass
class Result:
    """What one host's command did."""

    host: int
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float
    killed: str | None = None
    """Why the launcher killed it: ``"timeout"``, ``"peer failed"``, or None if it exited itself."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None


_open_clusters: set[Cluster] = set()
_saved_handlers: dict[signal.Signals, object] = {}
_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _exit_on_signal(signum: int, frame: types.FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through Cluster.__exit__ / finally, which tear down


def _install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit while a cluster is open, if nobody else handles them."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _EXIT_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            _saved_handlers[sig] = signal.signal(sig, _exit_on_signal)


def _restore_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in list(_saved_handlers.items()):
        if signal.getsignal(sig) is _exit_on_signal:
            signal.signal(sig, handler)  # type: ignore[arg-type]
        del _saved_handlers[sig]


class Cluster:
    """N hosts on a switch, every link limited to ``rate`` in both directions.

    Use as a context manager (or call :meth:`start` and :meth:`close`); the namespaces are removed
    on exit, on exceptions, on SIGINT/SIGTERM/SIGHUP and at interpreter exit.

    Args:
        num_hosts: number of hosts (namespaces), 1 to 64.
        rate: tc rate of every link, e.g. ``"1gbit"``, ``"100mbit"``, ``"20mbit"``; None is unlimited.
        burst: tbf bucket size (tc syntax, e.g. ``"64kb"``); None is 64 KB or 2 ms of ``rate``,
            whichever is more.
        latency: tbf queueing limit (how long a packet may wait before it is dropped).

    Example::

        with Cluster(num_hosts=2, rate="100mbit") as cluster:
            results = cluster.torchrun(["-m", "rangerdl", "train", "cfg.toml"], timeout_s=600)
            assert all(r.ok for r in results), results[0].stderr
    """

    def __init__(
        self,
        num_hosts: int = 2,
        rate: str | None = "100mbit",
        *,
        burst: str | None = None,
        latency: str = "100ms",
    ) -> None:
        if not 1 <= num_hosts <= MAX_HOSTS:
            raise ValueError(f"num_hosts: expected 1 to {MAX_HOSTS}, got {num_hosts}")
        parse_rate(rate)
        self.num_hosts = num_hosts
        self.rate = rate
        self.burst = burst
        self.latency = latency
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []  # everything we created, deleted by close()
        self._runs = itertools.count()
        self._started = False

    def start(self) -> Cluster:
        """Create the switch and the hosts and apply the rate; undone if any step fails."""
        if self._started:
            raise RuntimeError("a Cluster can be started once; make a new one")
        ok, reason = available()
        if not ok:
            raise RuntimeError(f"cannot build a netsim cluster: {reason}")
        self._started = True
        _open_clusters.add(self)
        if len(_open_clusters) == 1:
            _install_signal_handlers()
        atexit.register(self.close)
        base = _new_name_base()
        try:
            switch = self._add_namespace(f"{base}-s")
            _ip(switch, "link", "add", "rdlbr0", "type", "bridge")
            _ip(switch, "link", "set", "rdlbr0", "up")
            for i in range(self.num_hosts):
                self.hosts.append(self._add_host(i, base, switch))
            self.set_rate(self.rate)
        except BaseException:
            self.close()
            raise
        logger.info("netsim: %d hosts at %s (%s)", self.num_hosts, self.rate or "no limit", base)
        return self

    def _add_namespace(self, name: str) -> str:
        _cmd("ip", "netns", "add", name)
        self.namespaces.append(name)
        return name

    def _add_host(self, index: int, base: str, switch: str) -> Host:
        host = Host(index, f"{base}-h{index}", f"rdlh{index}", _host_ip(index))
        ns, port = self._add_namespace(host.namespace), f"rdlp{index}"
        # No IPv6: no router solicitations on slow links, one address per interface for gloo.
        no_ipv6 = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        _cmd("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *no_ipv6, check=False)
        _ip(ns, "link", "add", host.ifname, "type", "veth", "peer", "name", port, "netns", switch)
        _ip(ns, "addr", "add", f"{host.ip}/24", "dev", host.ifname)
        _ip(ns, "link", "set", "lo", "up")
        _ip(ns, "link", "set", host.ifname, "up")
        _ip(switch, "link", "set", port, "master", "rdlbr0")
        _ip(switch, "link", "set", port, "up")
        return host

    def set_rate(self, rate: str | None) -> None:
        """Change the limit of every link, both directions; None (or ``"none"``) removes it."""
        unlimited = parse_rate(rate) is None
        switch = self.namespaces[0]
        for host in self.hosts:
            for ns, dev in ((host.namespace, host.ifname), (switch, f"rdlp{host.index}")):
                if unlimited:
                    _tc(ns, "qdisc", "del", "dev", dev, "root", check=False)  # absent is fine
                else:
                    assert rate is not None
                    _tc(
                        ns,
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        *_tbf(rate, self.burst, self.latency),
                    )
        self.rate = None if unlimited else rate

    def sent_bytes(self) -> list[int]:
        """Bytes each host's interface has sent so far (its kernel counter ``tx_bytes``: Ethernet
        frames, headers included), in host order. Differences of two readings are a run's traffic
        on the wire."""
        out = []
        for host in self.hosts:
            shown = _ip(host.namespace, "-j", "-s", "link", "show", "dev", host.ifname).stdout
            out.append(int(json.loads(shown)[0]["stats64"]["tx"]["bytes"]))
        return out

    def close(self) -> None:
        """Kill every process in our namespaces and delete them; safe to call twice."""
        while self.namespaces:  # one at a time, so a signal in between leaves a consistent list
            _delete_namespace(self.namespaces[-1])
            self.namespaces.pop()
        self.hosts.clear()
        if self in _open_clusters:
            _open_clusters.discard(self)
            if not _open_clusters:
                _restore_signal_handlers()
        atexit.unregister(self.close)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        cmd: Sequence[str],
        host: int = 0,
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        cwd: str | Path | None = None,
    ) -> Result:
        """Run ``cmd`` in one host and wait for it (killed after ``timeout_s``)."""
        return self.run_all({host: cmd}, env=env, timeout_s=timeout_s, cwd=cwd)[0]

    def run_all(
        self,
        cmds: Mapping[int, Sequence[str]] | Sequence[Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        host_env: Mapping[int, Mapping[str, str]] | None = None,
        timeout_s: float | None = None,
        cwd: str | Path | None = None,
        log_dir: str | Path | None = None,
        peer_failure_grace_s: float = 15.0,
    ) -> list[Result]:
        """Run one command per host at once; results in host order.

        Every command gets ``os.environ``, ``GLOO_SOCKET_IFNAME`` set to its host's interface,
        then ``env``, then ``host_env[host]``. Output goes to ``log_dir/host<i>.{stdout,stderr}``
        (a temporary folder if None) and into the results. A command still running at
        ``timeout_s``, or ``peer_failure_grace_s`` after another one failed, is killed: SIGTERM to
        its process group, then after 5 s SIGKILL to every process left in its namespace (torchrun
        starts each worker with setsid, in a process group of its own, so one group is not enough).
        """
        if not self.hosts:
            raise RuntimeError("cluster is not started")
        jobs = dict(enumerate(cmds)) if isinstance(cmds, Sequence) else dict(cmds)
        for i in jobs:
            if not 0 <= i < self.num_hosts:
                raise ValueError(f"host {i}: expected 0 to {self.num_hosts - 1}")
        with tempfile.TemporaryDirectory(prefix="netsim-") as tmp:
            out_dir = Path(log_dir) if log_dir is not None else Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            procs: dict[int, subprocess.Popen[bytes]] = {}
            ended: dict[int, float] = {}
            killed: dict[int, str] = {}
            start = time.monotonic()
            try:
                for i, cmd in jobs.items():
                    host_vars = {"GLOO_SOCKET_IFNAME": self.hosts[i].ifname, **(env or {})}
                    host_vars |= (host_env or {}).get(i, {})
                    procs[i] = self._spawn(i, cmd, host_vars, out_dir, cwd)
                deadline = start + timeout_s if timeout_s is not None else float("inf")
                killed = self._wait(procs, ended, deadline, peer_failure_grace_s)
            finally:
                running = {i: p for i, p in procs.items() if i not in ended}
                self._kill(running)  # timed out, peer failed, or we were interrupted
                ended |= dict.fromkeys(running, time.monotonic())
            return [
                Result(
                    host=i,
                    returncode=procs[i].returncode,
                    stdout=(out_dir / f"host{i}.stdout").read_text(errors="replace"),
                    stderr=(out_dir / f"host{i}.stderr").read_text(errors="replace"),
                    elapsed_s=ended[i] - start,
                    killed=killed.get(i),
                )
                for i in sorted(procs)
            ]

    def _spawn(
        self,
        host: int,
        cmd: Sequence[str],
        env: Mapping[str, str],
        out_dir: Path,
        cwd: str | Path | None,
    ) -> subprocess.Popen[bytes]:
        with (
            open(out_dir / f"host{host}.stdout", "wb") as out,
            open(out_dir / f"host{host}.stderr", "wb") as err,
        ):
            return subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host].namespace, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **env},
                cwd=cwd,
                start_new_session=True,  # our own process group, apart from the caller's Ctrl-C
            )

    @staticmethod
    def _wait(
        procs: Mapping[int, subprocess.Popen[bytes]],
        ended: dict[int, float],
        deadline: float,
        peer_failure_grace_s: float,
    ) -> dict[int, str]:
        """Poll until all exit or the deadline; fills ``ended``; returns who to kill and why."""
        reason = "timeout"
        while len(ended) < len(procs):
            now = time.monotonic()
            for i, proc in procs.items():
                if i not in ended and proc.poll() is not None:
                    ended[i] = now
                    # A failed host leaves its peers blocked in collectives: give up on them soon.
                    if proc.returncode != 0 and now + peer_failure_grace_s < deadline:
                        deadline, reason = now + peer_failure_grace_s, "peer failed"
            if len(ended) < len(procs) and now >= deadline:
                return dict.fromkeys(procs.keys() - ended.keys(), reason)
            time.sleep(0.05)
        return {}

    def _kill(self, procs: Mapping[int, subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
        """SIGTERM the process groups, then SIGKILL all that is left in those hosts' namespaces."""
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for host, proc in procs.items():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _kill_processes(self.hosts[host].namespace)
            proc.wait()

    def torchrun(
        self,
        target: Sequence[str],
        *,
        nproc_per_node: int = 1,
        env: Mapping[str, str] | None = None,
        host_env: Mapping[int, Mapping[str, str]] | None = None,
        timeout_s: float | None = 600.0,
        torchrun_args: Sequence[str] = (),
        cwd: str | Path | None = None,
        log_dir: str | Path | None = None,
    ) -> list[Result]:
        """Run ``torchrun ... TARGET`` on every host, c10d rendezvous on host 0.

        Args:
            target: what follows torchrun's own options: ``["script.py", *args]`` or
                ``["-m", "module", *args]``.
            nproc_per_node: processes per host; host i holds global ranks
                ``i * nproc_per_node`` to ``(i + 1) * nproc_per_node - 1``.
            torchrun_args: extra torchrun options, e.g. ``["--max-restarts=0"]``.
            timeout_s, env, host_env, cwd, log_dir: as for :meth:`run_all`.
        """
        if not self.hosts:
            raise RuntimeError("cluster is not started")
        rdzv_id = f"{self.namespaces[0]}-run{next(self._runs)}"
        endpoint = f"{self.hosts[0].ip}:{RDZV_PORT}"
        cmds = []
        for h in self.hosts:
            argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.num_hosts}"]
            argv += [f"--nproc-per-node={nproc_per_node}"]
            argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}"]
            # The namespaces share one hostname: say who serves the store and where we are.
            argv += [f"--rdzv-conf=is_host={int(h.index == 0)}", f"--local-addr={h.ip}"]
            cmds.append([*argv, *torchrun_args, *target])
        return self.run_all(
            cmds, env=env, host_env=host_env, timeout_s=timeout_s, cwd=cwd, log_dir=log_dir
        )


def cleanup(dry_run: bool = False) -> list[str]:
    """Delete leftover namespaces of netsim processes that died (e.g. by SIGKILL).

    Only names of our own pattern count, and only if they were made in this pid namespace by a
    process that no longer exists; anything else is left alone. Returns the names removed.
    """
    removed = []
    for name in _namespaces():
        match = _NAME_RE.match(name)
        if match is None:
            continue
        if int(match["pidns"]) != _pid_namespace():
            logger.info("keeping %s: made in another pid namespace", name)
            continue
        try:
            os.kill(int(match["pid"]), 0)
            logger.info("keeping %s: its process %s is alive", name, match["pid"])
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, owned by someone else
        if not dry_run:
            _delete_namespace(name)
        removed.append(name)
    return removed


def measure_allreduce(
    cluster: Cluster, mbytes: float, repeats: int = 3, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Time a gloo all-reduce of ``mbytes`` MB (1e6 bytes) of float32 across the cluster's hosts."""
    results = cluster.torchrun(
        [str(WORKER), "--mbytes", str(mbytes), "--repeats", str(repeats)],
        env={"OMP_NUM_THREADS": "1"},
        timeout_s=timeout_s,
    )
    failed = [r for r in results if not r.ok]
    if failed:
        r = failed[0]
        raise RuntimeError(
            f"all-reduce failed on host {r.host} (rc {r.returncode}, killed: {r.killed}):\n"
            f"{r.stderr[-3000:]}"
        )
    lines = [line for line in results[0].stdout.splitlines() if line.startswith("NETSIM ")]
    if not lines:
        raise RuntimeError(f"no result from host 0:\n{results[0].stdout[-2000:]}")
    return json.loads(lines[-1].removeprefix("NETSIM "))


def _lower_bound_s(num_hosts: int, mbytes: float, rate: str | None) -> float | None:
    """Ring all-reduce sends 2 (n - 1) / n of the data out of each host: the time that takes."""
    bits_per_s = parse_rate(rate)
    if bits_per_s is None or num_hosts < 2:
        return None
    return 2 * (num_hosts - 1) / num_hosts * mbytes * 1e6 * 8 / bits_per_s


def _cmd_allreduce(args: argparse.Namespace) -> int:
    rows = []
    print(f"{'hosts':>5} {'rate':>9} {'MB':>6} {'median s':>9} {'min s':>8} {'bound s':>8}")
    for num_hosts in args.hosts:
        with Cluster(num_hosts=num_hosts, rate=None) as cluster:
            for rate in args.rate:
                cluster.set_rate(rate)
                res = measure_allreduce(cluster, args.mbytes, args.repeats, args.timeout_s)
                bound = _lower_bound_s(num_hosts, args.mbytes, cluster.rate)
                row = {"hosts": num_hosts, "rate": rate, "mbytes": args.mbytes}
                row |= {"median_s": res["median_s"], "min_s": min(res["times_s"])}
                row |= {"times_s": res["times_s"], "lower_bound_s": bound}
                rows.append(row)
                bound_txt = f"{bound:8.3f}" if bound is not None else f"{'-':>8}"
                print(
                    f"{num_hosts:>5} {rate:>9} {args.mbytes:>6g} {row['median_s']:>9.3f} "
                    f"{row['min_s']:>8.3f} {bound_txt}",
                    flush=True,
                )
    if args.out:
        out = Path(args.out)
        tmp = out.with_suffix(".tmp")
        payload = {
            "what": "gloo all-reduce of float32 across netsim hosts (1 process per host)",
            "command": " ".join(["python", *sys.argv]),
            "repeats": args.repeats,
            "tbf": "burst max(64 KB, 2 ms of rate), latency 100ms, on both ends of every link",
            "rows": rows,
        }
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


def _cmd_torchrun(args: argparse.Namespace) -> int:
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    if not target:
        raise SystemExit("torchrun: give the script (or -m module) and its arguments after --")
    with Cluster(num_hosts=args.hosts, rate=args.rate) as cluster:
        results = cluster.torchrun(
            target,
            nproc_per_node=args.nproc_per_node,
            timeout_s=args.timeout_s,
            log_dir=args.log_dir,
        )
    for r in results:
        status = f"rc {r.returncode}" + (f", killed: {r.killed}" if r.killed else "")
        print(f"===== host {r.host} ({status}, {r.elapsed_s:.1f} s) =====")
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
    return max((abs(r.returncode) for r in results), default=0)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``check``, ``allreduce``, ``torchrun``, ``cleanup``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="say whether this machine can build a cluster")
    p = sub.add_parser("allreduce", help="time a gloo all-reduce across hosts")
    p.add_argument("--hosts", type=int, nargs="+", default=[2])
    p.add_argument("--rate", nargs="+", default=["100mbit"], help="tc rates; 'none' = unlimited")
    p.add_argument("--mbytes", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--out", help="write the table as JSON here")
    p = sub.add_parser("torchrun", help="run torchrun on every host: ... torchrun -- TARGET")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=3600.0)
    p.add_argument("--log-dir", help="keep host<i>.stdout/.stderr here (to follow them live)")
    p.add_argument("target", nargs=argparse.REMAINDER)
    p = sub.add_parser("cleanup", help="remove namespaces left by dead netsim processes")
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "cleanup":
        removed = cleanup(dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(removed)} namespace(s)" + "".join(f"\n  {n}" for n in removed))
        return 0
    ok, reason = available()
    print(("ok: " if ok else "unavailable: ") + reason)
    if not ok:
        return 1
    rates = getattr(args, "rate", [])
    for rate in rates if isinstance(rates, list) else [rates]:
        parse_rate(rate)  # a typo fails here, before any namespace exists
    if args.command == "allreduce":
        return _cmd_allreduce(args)
    if args.command == "torchrun":
        return _cmd_torchrun(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
