"""Fault injection: replica groups of distributed Ranger on torchft killed with SIGKILL at random
times and restarted by the same command, side by side with torchrun's restart-everyone path.

::

    sudo python benchmarks/faults.py              # 3 groups, GPT workload, links none and 100mbit
    python benchmarks/faults.py --quick           # loopback, a tiny MLP, 2 kills (make test)
    sudo python benchmarks/faults.py --cpu-per-host 0.667 --no-torchrun   # hosts with a CPU quota each
    sudo python benchmarks/faults.py --cpu-per-host 0.667 --no-ft --merge  # torchrun's path beside
    sudo python benchmarks/faults.py --cpu-per-host 0.667 --overlap --merge  # syncs overlapped

Per link, two paths, each run three times on the same workload (``--config``, k =
``--sync-every``): clean, under kills, and clean again.

1. ``ft-clean``: ``--groups`` replica groups (``rangerdl train --distributed.backend=torchft``, one
   per simulated host, the Lighthouse beside group 0, ``--heartbeat-timeout-ms`` 1000) with no
   fault: steps per second per group.
2. ``ft-faults``: the same, ``--kills`` times a random group is SIGKILLed at a random time
   (``--kill-every-s`` apart on average, uniform in [0.5, 1.5] of it; syncs take a share of the
   time, so some kills land in one) and started again at once with the same command.
3. ``ft-clean-after``: run 1 again (``--no-clean-after``: not), so that a drift of this shared
   machine's speed during run 2 does not pass for a cost or a gain of the faults.
4. ``tr-clean``, ``tr-faults``, ``tr-clean-after`` (``--no-torchrun``: not): one torchrun agent per
   host (``--max-restarts``), distributed Ranger through ``OuterSync``, the faulted run as many
   steps as the torchft one; the same kill schedule hits a random worker, and torchrun restarts
   every worker from the last checkpoint (every ``--checkpoint-every`` steps). ``--no-ft`` runs
   this path alone; with ``--merge`` it joins the torchft path's cell of the same settings.
   ``--quick`` (a smoke test, numbers meaningless) runs this path's faulted run for its own
   steps with a 10 s tail and no clean run after it.

Measured (``metrics.jsonl`` with a row per step, each process life kept apart, and each process's
output timestamped as it arrives):

- ``stalls``: the longest gap between two consecutive steps of any process (``time/train_s``,
  which holds the blocking syncs) and how many exceed ``--quorum-timeout-s``;
- ``heal_s``: per restart, seconds from the restarted process's start to its "healed from a
  peer" line (back in the quorum, with the live groups' state);
- ``discarded``: syncs the survivors discarded (a kill inside a sync: never half-applied);
- ``equal``: every group's final model (slow weights) bitwise equal to group 0's;
- ``goodput``: committed steps (per process life: the steps up to its last committed sync, less
  the ones a heal overwrote) per second of the whole faulted run, over the clean runs' steps per
  second (their mean; ``goodput_vs_before`` and ``goodput_vs_after`` against each); for torchrun the job's final step (every worker) over its wall time, against its clean
  run; both from launch to the end, start-up included;
- ``val_loss``: the final validation loss of the faulted and the clean run.

All the simulated hosts share this machine's CPUs: when a group dies, the survivors get its
share and step faster than they would on hosts of their own, which flatters the torchft runs'
goodput (torchrun stops every worker at once, so its runs are not flattered). ``--cpu-per-host``
gives each host a CFS quota of its share, so a dead group's CPU stays idle.

Writes ``benchmarks/results/faults.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.append(str(HERE / "netsim"))
sys.path.append(str(REPO / "src"))

from common import atomic_write_json  # noqa: E402

OUT = HERE / "results" / "faults.json"
LIGHTHOUSE_PORT = 29510
RDZV_PORT = 29400
QUICK_ARGS = [
    "--model.name=mlp",
    "--model.args.hidden=32",
    "--data.source=digits",
    "--data.batch_size=48",
    "--optim.lr=3e-3",
]


@dataclass
class Life:
    """One process of one group (or torchrun agent), from its start to its end or its kill."""

    group: int
    started: float
    proc: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)
    killed_at: float | None = None
    ended_at: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> threading.Thread:
        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line))

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)


class Hosts:
    """Where the processes run: the namespaces of a netsim cluster (root), or loopback.

    ``cpu_per_host``: each host's processes share a CFS quota of that many CPUs (a cgroup v1
    ``cpu`` group per host), so that a host whose group died leaves its CPU idle, as a separate
    machine would, instead of handing it to the survivors on this one machine. ``0``: no quota.
    """

    def __init__(self, count: int, rate: str | None, netsim: bool, cpu_per_host: float = 0.0):
        self.count, self.rate, self.cluster = count, rate, None
        self.cgroups: list[Path] = []
        if cpu_per_host > 0:
            root = Path("/sys/fs/cgroup/cpu")
            if not (root / "cpu.cfs_quota_us").is_file():
                raise RuntimeError(f"--cpu-per-host needs the cgroup v1 cpu controller at {root}")
            for host in range(count):
                group = root / f"rdl-faults-{os.getpid()}-h{host}"
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text("100000")
                (group / "cpu.cfs_quota_us").write_text(str(int(cpu_per_host * 100000)))
                self.cgroups.append(group)
        if netsim:
            from netsim import Cluster

            self.cluster = Cluster(num_hosts=count, rate=rate).start()

    def ip(self, host: int) -> str:
        return self.cluster.hosts[host].ip if self.cluster is not None else "127.0.0.1"

    def spawn(self, host: int, cmd: list[str], env: dict[str, str], cwd: Path) -> Any:
        full = {**os.environ, **env, "OMP_NUM_THREADS": "1", "RUST_LOG": "warn"}
        if self.cluster is not None:
            full["GLOO_SOCKET_IFNAME"] = self.cluster.hosts[host].ifname
            cmd = ["ip", "netns", "exec", self.cluster.hosts[host].namespace, *cmd]
        if self.cgroups:  # the shell joins the host's cgroup, then becomes the command (outside
            # `ip netns exec`, which mounts a sysfs of the namespace's own)
            procs = self.cgroups[host] / "cgroup.procs"
            cmd = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
        return subprocess.Popen(
            cmd,
            env=full,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
        for group in self.cgroups:  # empty once its processes are gone
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_tree(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [r for r in rows if "time/train_s" in r and "train/loss" in r]


def committed_steps(rows: list[dict[str, Any]], finished: bool, lag: int = 0) -> int:
    """Steps of one process life that reached a committed sync and were not overwritten by a
    heal (a finished life: all of them after its heal; its final sync commits the rest).
    ``lag``: steps between a sync's launch and the step it is counted at (overlap: merged
    ``overlap_steps`` later, the steps trained meanwhile in the next sync)."""
    first = 0
    for i, r in enumerate(rows):
        if r.get("comm/healed", 0) >= 1:
            first = i + 1  # the steps before the heal were replaced by the peer's
            break
    last = len(rows)
    if not finished:
        syncs = [r.get("comm/syncs", 0) for r in rows]
        last = max(
            (i + 1 for i in range(len(rows)) if i == 0 or syncs[i] > syncs[i - 1]), default=0
        )
        if syncs and syncs[0] == 0 and last == 1:
            last = 0
        elif last:
            last -= lag
    return max(0, last - first)


def steady_step_s(rows: list[dict[str, Any]]) -> float | None:
    """Seconds per step once running: over the last 90% of the rows (``time/train_s``), past
    the first quorum and the first evaluation-free warm-up."""
    skip = len(rows) // 10
    if len(rows) - skip < 10:
        return None
    return (rows[-1]["time/train_s"] - rows[skip]["time/train_s"]) / (len(rows) - 1 - skip)


def max_gap(rows: list[dict[str, Any]]) -> float:
    times = [r["time/train_s"] for r in rows]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class Job:
    """One run of the workload: torchft replica groups or torchrun agents, with or without kills."""

    def __init__(self, args: argparse.Namespace, hosts: Hosts, kind: str, name: str, work: Path):
        self.args, self.hosts, self.kind, self.name, self.work = args, hosts, kind, name, work
        self.lives: list[Life] = []
        self.lighthouse: subprocess.Popen[str] | None = None
        fixed = LIGHTHOUSE_PORT if kind == "ft" else RDZV_PORT
        self.port = fixed if hosts.cluster is not None else free_port()

    def common(self, steps: int) -> list[str]:
        a = self.args
        cmd = [str(a.config)] if a.config else []
        cmd += QUICK_ARGS if a.quick else [f"--data.batch_size={a.batch_size}"]
        cmd += [f"--run.dir={self.work / 'runs'}", f"--run.name={self.name}"]
        cmd += [f"--train.steps={steps}", "--train.log_every=1", "--train.eval_every=0"]
        cmd += [f"--train.final_eval_batches={a.final_eval_batches}", "--train.threads=1"]
        cmd += ["--log.tensorboard=false", "--log.progress=false", f"--optim.k={a.sync_every}"]
        if a.overlap:  # each sync in flight for a step (overlap_steps 1), eager
            cmd += ["--distributed.overlap=true", "--distributed.eager=true"]
        return cmd

    def group_cmd(self, group: int, steps: int) -> list[str]:
        cmd = [sys.executable, "-m", "rangerdl", "train", *self.common(steps)]
        cmd += ["--train.checkpoint_every=0", "--distributed.backend=torchft"]
        cmd += [f"--distributed.lighthouse={self.hosts.ip(0)}:{self.port}"]
        cmd += [f"--distributed.replica_groups={self.args.groups}"]
        cmd += [
            f"--distributed.replica_group={group}",
            f"--distributed.hostname={self.hosts.ip(group)}",
        ]
        cmd += [f"--distributed.quorum_timeout_s={self.args.quorum_timeout_s}"]
        cmd += ["--distributed.timeout_s=60"]
        return cmd

    def agent_cmd(self, host: int, steps: int, rdzv_id: str) -> list[str]:
        g = self.args.groups
        endpoint = f"{self.hosts.ip(0)}:{self.port}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={g}", "--nproc-per-node=1"]
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}"]
        cmd += [f"--rdzv-conf=is_host={int(host == 0)}", f"--local-addr={self.hosts.ip(host)}"]
        cmd += [f"--max-restarts={self.args.kills + 2}", "-m", "rangerdl", "train"]
        cmd += [*self.common(steps), f"--train.checkpoint_every={self.args.checkpoint_every}"]
        return cmd

    def start(self, group: int, steps: int) -> Life:
        env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}
        if self.kind == "ft":
            cmd = self.group_cmd(group, steps)
        else:
            cmd = self.agent_cmd(group, steps, f"faults-{self.name}")
        life = Life(group, time.monotonic(), self.hosts.spawn(group, cmd, env, REPO))
        life.read()
        self.lives.append(life)
        return life

    def run(self, steps: int, kills: int, timeout_s: float) -> dict[str, Any]:
        a = self.args
        rng = random.Random(a.seed)
        if self.kind == "ft":
            lh = [
                sys.executable,
                "-m",
                "rangerdl",
                "lighthouse",
                f"--bind={self.hosts.ip(0)}:{self.port}",
            ]
            lh += [f"--min-replicas={1}", f"--join-timeout-ms={a.join_timeout_ms}"]
            lh += [f"--heartbeat-timeout-ms={a.heartbeat_timeout_ms}"]
            self.lighthouse = self.hosts.spawn(0, lh, {}, REPO)
            time.sleep(1.0)
        t0 = time.monotonic()
        live = {g: self.start(g, steps) for g in range(a.groups)}
        # the kill clock starts once training has (the model line: printed before the first
        # step, by every group, or by rank 0 under torchrun): start-up is not what is measured
        started = (
            (lambda: all(life.first("model: ") for life in live.values()))
            if (self.kind == "ft")
            else (lambda: any(life.first("model: ") for life in live.values()))
        )
        while not started() and time.monotonic() < t0 + timeout_s:
            if any(life.proc.poll() is not None for life in live.values()):
                break
            time.sleep(0.05)
        next_kill = time.monotonic() + a.warmup_s + rng.uniform(0.5, 1.5) * a.kill_every_s
        done_kills, deadline = 0, t0 + timeout_s
        try:
            while time.monotonic() < deadline:
                if all(life.proc.poll() is not None for life in live.values()):
                    break
                now = time.monotonic()
                running = all(life.proc.poll() is None for life in live.values())
                if done_kills < kills and now >= next_kill and running:
                    group = rng.randrange(a.groups)
                    if self.kill(live[group]):
                        done_kills += 1
                        if self.kind == "ft":  # the same command, at once
                            self.keep_metrics(live[group])
                            live[group] = self.start(group, steps)
                    next_kill = now + rng.uniform(0.5, 1.5) * a.kill_every_s
                time.sleep(0.05)
        finally:
            for life in live.values():
                if life.proc.poll() is None:
                    kill_tree(life.proc)
            if self.lighthouse is not None:
                kill_tree(self.lighthouse, signal.SIGTERM)
        wall = time.monotonic() - t0
        time.sleep(0.5)  # the output pumps drain
        for i, life in enumerate(self.lives):
            log = self.work / "logs" / f"{self.name}-{i}-group{life.group}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(f"{t - t0:9.3f} {line}" for t, line in life.lines))
        for life in live.values():
            life.ended_at = life.ended_at or time.monotonic()
            if self.kind == "ft":
                life.rows = read_rows(self.folder(life.group) / "metrics.jsonl")
        return self.measure(steps, wall, done_kills, live)

    def folder(self, group: int) -> Path:
        suffix = f"-group{group}" if self.kind == "ft" else ""
        return self.work / "runs" / f"{self.name}{suffix}"

    def kill(self, life: Life) -> bool:
        """SIGKILL a group (torchft) or one worker under an agent (torchrun); whether one died."""
        if life.proc.poll() is not None:
            return False
        if self.kind == "ft":
            life.killed_at = time.monotonic()
            kill_tree(life.proc)
            life.ended_at = time.monotonic()
            return True
        workers = [p for p in descendants(life.proc.pid) if b"rangerdl" in cmdline(p)]
        workers = [p for p in workers if b"torch.distributed.run" not in cmdline(p)]
        if not workers:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(workers[0], signal.SIGKILL)
        return True

    def keep_metrics(self, life: Life) -> None:
        """A killed group's rows, moved aside before its restart writes its own (a restart
        killed before it wrote any must not show the last one's)."""
        path = self.folder(life.group) / "metrics.jsonl"
        life.rows = read_rows(path)
        if path.is_file():
            path.rename(path.with_name(f"metrics-life{len(self.lives)}.jsonl"))

    def measure(self, steps: int, wall: float, kills: int, live: dict[int, Life]) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": steps, "wall_s": wall, "kills": kills}
        finished = all(life.proc.returncode == 0 for life in live.values())
        out["finished"] = finished
        train_s = [self.summary(g).get("train_time_s") for g in range(self.args.groups)]
        if finished and self.kind == "torchrun":
            train_s = [self.summary(None).get("train_time_s")]
        out["train_s"] = max((t for t in train_s if t is not None), default=None)
        rows = read_rows(self.folder(0 if self.kind == "ft" else None) / "metrics.jsonl")
        out["step_s"] = steady_step_s(rows)
        if not finished:
            out["tail"] = {
                g: "".join(line for _, line in life.lines[-30:]) for g, life in live.items()
            }
        if self.kind == "ft":
            lives = self.lives
            out["lives"] = [
                {
                    "group": life.group,
                    "rows": len(life.rows),
                    "first_step": life.rows[0]["step"] if life.rows else None,
                    "last_step": life.rows[-1]["step"] if life.rows else None,
                    "killed": life.killed_at is not None,
                    "committed": committed_steps(
                        life.rows,
                        life.killed_at is None and life.proc.returncode == 0,
                        1 if self.args.overlap else 0,
                    ),
                }
                for life in lives
            ]
            out["committed_steps"] = sum(life["committed"] for life in out["lives"])
            gaps = [max_gap(life.rows) for life in lives]
            out["max_stall_s"] = max(gaps, default=0.0)
            out["stalls_over_quorum_timeout"] = sum(g > self.args.quorum_timeout_s for g in gaps)
            restarts = [life for life in lives[self.args.groups :]]
            heal = [life.first("healed from a peer") for life in restarts]
            out["heal_s"] = [
                None if t is None else t - life.started
                for t, life in zip(heal, restarts, strict=True)
            ]
            last = [life.rows[-1] for life in live.values() if life.rows]
            out["discarded"] = sum(r.get("comm/discarded", 0) for r in last)
            out["healed"] = sum(r.get("comm/healed", 0) for life in lives for r in life.rows[-1:])
            if finished:
                out["equal"] = self.equal_models(steps)
                out["val_loss"] = self.summary(0).get("val/loss")
        else:
            out["committed_steps"] = steps * self.args.groups if finished else None
            if finished:
                out["val_loss"] = self.summary(None).get("val/loss")
                restarts = "".join(line for life in self.lives for _, line in life.lines)
                out["restarts_seen"] = restarts.count("resuming ")
        return out

    def summary(self, group: int | None) -> dict[str, Any]:
        path = self.folder(group or 0) / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def equal_models(self, steps: int) -> bool:
        import torch

        models = [
            torch.load(
                self.folder(g) / "checkpoints" / f"step-{steps}" / "model.pt", weights_only=True
            )
            for g in range(self.args.groups)
        ]
        return all(all(torch.equal(m[k], models[0][k]) for k in models[0]) for m in models[1:])


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def goodput(faults: dict[str, Any], cleans: list[dict[str, Any]], groups: int) -> float | None:
    """Committed steps of the faulted run over what the clean runs' groups train in the same
    time: their mean steady seconds per step per group (:func:`steady_step_s`) against the
    faulted run's wall time less their mean fixed costs (wall time less steps at that rate:
    start-up, the first quorum, the final evaluation). Clean runs before and after the faulted
    one: this shared machine's speed drifts by several percent over a 25-minute run."""
    if not cleans or any(not c.get("step_s") for c in cleans):
        return None
    if faults.get("committed_steps") is None:
        return None
    step_s = sum(c["step_s"] for c in cleans) / len(cleans)
    overhead = sum(c["wall_s"] - c["steps"] * c["step_s"] for c in cleans) / len(cleans)
    return faults["committed_steps"] / (groups / step_s * (faults["wall_s"] - overhead))


def run_path(
    args: argparse.Namespace,
    hosts: Hosts,
    work: Path,
    cell: dict[str, Any],
    kind: str,
    name: str,
    steps: int,
    timeout: float,
    tail_s: float,
    clean_after: bool,
) -> int:
    """One path (``ft``: torchft groups, ``torchrun``) on one link: clean, faulted (``steps``;
    0: what the clean run trains in the kill schedule's time plus ``tail_s``), clean again
    (``clean_after``); their records go into ``cell`` (``{kind}_clean``, ``{kind}_faults``,
    ``{kind}_clean_after``) with the goodput. Returns the faulted run's steps (the next path
    runs the same)."""
    label, key = cell["link"], "ft" if kind == "ft" else "torchrun"
    clean = Job(args, hosts, kind, f"{name}-clean", work).run(args.clean_steps, 0, timeout)
    cell[f"{key}_clean"] = clean
    print(f"[{label}] {key} clean: {json.dumps(clean)}", flush=True)
    if not clean["finished"]:
        raise RuntimeError(f"[{label}] the clean {key} run failed: {clean.get('tail')}")
    budget_s = args.warmup_s + args.kills * args.kill_every_s + tail_s
    steps = steps or int(budget_s / (clean["step_s"] or 0.05))
    faults = Job(args, hosts, kind, f"{name}-faults", work).run(steps, args.kills, timeout)
    faults |= {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit()}
    cell[f"{key}_faults"] = faults
    shown = {k: v for k, v in faults.items() if k != "tail"}
    print(f"[{label}] {key} faults: {json.dumps(shown)}", flush=True)
    cleans = [clean]
    if clean_after:
        after = Job(args, hosts, kind, f"{name}-clean-after", work).run(
            args.clean_steps, 0, timeout
        )
        cell[f"{key}_clean_after"] = after
        print(f"[{label}] {key} clean after: {json.dumps(after)}", flush=True)
        if after["finished"]:
            cleans.append(after)
            faults["goodput_vs_before"] = goodput(faults, [clean], args.groups)
            faults["goodput_vs_after"] = goodput(faults, [after], args.groups)
    if faults["finished"]:
        faults["goodput"] = goodput(faults, cleans, args.groups)
    print(f"[{label}] {key} goodput: {faults.get('goodput')}", flush=True)
    return steps


def run_link(args: argparse.Namespace, rate: str | None, netsim: bool) -> dict[str, Any]:
    label = rate or "none"
    hosts = Hosts(args.groups, rate, netsim, args.cpu_per_host)
    work = Path(tempfile.mkdtemp(prefix=f"faults-{label}-"))
    cell: dict[str, Any] = {
        "link": label,
        "groups": args.groups,
        "netsim": netsim,
        "kills": args.kills,
        "kill_every_s": args.kill_every_s,
        "cpu_per_host": args.cpu_per_host,
        "heartbeat_timeout_ms": args.heartbeat_timeout_ms,
        "join_timeout_ms": args.join_timeout_ms,
        "overlap": args.overlap,
    }
    try:
        timeout = args.kills * args.kill_every_s * 2 + 600
        steps = args.steps
        for kind, name in (("ft", "ft"), ("torchrun", "tr")):
            if (kind == "ft" and args.ft) or (kind == "torchrun" and args.torchrun):
                # --quick: torchrun's path a smoke test of its own (no peer to heal from, so
                # no long tail; no second clean run), not a comparison
                tail_s, after = args.tail_s, args.clean_after
                if args.quick and kind == "torchrun":
                    steps, tail_s, after = 0, 10.0, False
                steps = run_path(args, hosts, work, cell, kind, name, steps, timeout, tail_s, after)
    finally:
        hosts.close()
        if args.keep:
            print(f"[{label}] kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return cell


def merge_cell(cells: list[dict[str, Any]], cell: dict[str, Any]) -> list[dict[str, Any]]:
    """``cells`` with ``cell`` in: one cell per link, kill rate, CPU quota, heartbeat timeout
    (2 s before it was an option) and sync mode (blocking, or ``--overlap``). A path run on its
    own (``--no-ft``, ``--no-torchrun``) joins the cell of the other path at the same settings,
    each path's faulted run keeping its own date, commit and command."""
    same = {
        "link": None,
        "kill_every_s": None,
        "cpu_per_host": 0.0,
        "heartbeat_timeout_ms": 2000,
        "overlap": False,
    }

    def key(c: dict[str, Any]) -> list[Any]:
        return [c.get(k, d) for k, d in same.items()]

    match = [c for c in cells if key(c) == key(cell)]
    if match:
        old = match[-1]
        for path in [k for k in old if k.endswith("_faults")]:
            for field in ("date", "commit", "command"):
                old[path].setdefault(field, old.get(field))
        cell = {**old, **cell}
    return [c for c in cells if key(c) != key(cell)] + [cell]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--config", type=Path, default=HERE / "configs" / "ttq_gpt.toml")
    p.add_argument("--links", nargs="+", default=["none", "100mbit"])
    p.add_argument("--groups", type=int, default=3)
    p.add_argument(
        "--batch-size", type=int, default=48, help="global (16 a group with 3, as the 2-host cells)"
    )
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--kill-every-s", type=float, default=60.0)
    p.add_argument("--warmup-s", type=float, default=20.0, help="no kill before (start-up)")
    p.add_argument("--sync-every", type=int, default=4)
    p.add_argument(
        "--overlap",
        action="store_true",
        help="both paths' syncs overlapped (in flight for a step) and eager",
    )
    p.add_argument("--steps", type=int, default=0, help="0: enough for the kills")
    p.add_argument(
        "--tail-s", type=float, default=30.0, help="seconds of training after the last kill"
    )
    p.add_argument("--clean-steps", type=int, default=400)
    p.add_argument("--checkpoint-every", type=int, default=100, help="torchrun's restart point")
    p.add_argument("--quorum-timeout-s", type=float, default=30.0)
    p.add_argument(
        "--heartbeat-timeout-ms",
        type=int,
        default=1000,
        help="the Lighthouse's: how soon a dead group is left out of the quorum (10 of "
        "torchft's 100 ms heartbeats)",
    )
    p.add_argument("--join-timeout-ms", type=int, default=3000, help="the Lighthouse's")
    p.add_argument(
        "--no-clean-after",
        dest="clean_after",
        action="store_false",
        help="no second clean torchft run after the faulted one (goodput against the first only)",
    )
    p.add_argument("--final-eval-batches", type=int, default=8)
    p.add_argument("--no-torchrun", dest="torchrun", action="store_false")
    p.add_argument("--no-ft", dest="ft", action="store_false", help="torchrun's path only")
    p.add_argument(
        "--cpu-per-host",
        type=float,
        default=0.0,
        help="a CPU quota per simulated host (cgroup v1, root), e.g. 0.667 for 3 hosts on 2 "
        "cores: a dead group's CPU stays idle instead of speeding up the others (0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="loopback, tiny MLP, 2 kills")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--keep", action="store_true", help="keep the run folders and logs")
    p.add_argument(
        "--merge", action="store_true", help="keep the other links' (or kill rates') cells in --out"
    )
    args = p.parse_args(argv)
    netsim = not args.quick
    if args.quick:
        args.config, args.links, args.groups, args.kills = None, ["none"], 2, 2
        # tail_s: the survivor trains on long enough for the last restart to join and heal,
        # even when a loaded machine takes 15 s or more to start it (a restart that comes up
        # after its peer finished has no one to heal from: it trains alone, and the models end
        # apart, which a 15 s tail let happen once in 4 runs with two of these side by side)
        args.kill_every_s, args.warmup_s, args.clean_steps, args.tail_s = 3.0, 3.0, 300, 30.0
        args.final_eval_batches, args.checkpoint_every = 2, 50
    if netsim:
        from netsim import available

        ok, why = available()
        if not ok:
            print(f"netsim unavailable ({why}); --quick runs on loopback", file=sys.stderr)
            return 2
    command = " ".join(
        ["python", "benchmarks/faults.py", *(argv if argv is not None else sys.argv[1:])]
    )
    kept = []
    if args.merge and args.out.is_file():  # the other links' cells, as they were run
        kept = json.loads(args.out.read_text())["cells"]
    for link in args.links:
        cell = run_link(args, None if link == "none" else link, netsim)
        cell |= {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": _commit(), "command": command}
        for path in [k for k in cell if k.endswith("_faults")]:
            cell[path]["command"] = command
        kept = merge_cell(kept, cell)
        payload = {
            "date": time.strftime("%Y-%m-%d"),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cells": kept,
        }
        atomic_write_json(args.out, payload)  # after every link: a later failure keeps it
        print(f"wrote {args.out}", flush=True)
    return 0


def _commit() -> str | None:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
