"""Running the time-to-quality protocol: launching ``rangerdl train`` (one process, plain
``torchrun --standalone``, or one ``torchrun`` agent per simulated host of ``benchmarks/netsim``),
reading its run folder, and the ``tune``, ``run`` and ``recheck`` stages that fill the JSON.

Each run's row keeps the exact command that reruns it, its validation curve ``[step, train
seconds, loss]``, its final numbers, the CPU share other processes used while it ran and, under
netsim, the bytes each host's interface sent (``wire_tx_bytes_per_host``: everything, headers
and evaluation traffic included).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common import atomic_write_json
from peers import launch as torchft_peer
from ttq import protocol as p

BENCH = p.BENCH
REPO = BENCH.parent
RESULTS = BENCH / "results"
OUT = RESULTS / "ttq_protocol.json"
sys.path.append(str(BENCH / "netsim"))

REDO_SINCE = time.time()
"""With ``--redo``: runs of this invocation (started after this) are kept, earlier ones dropped."""


# ---------------------------------------------------------------------------------- launching
@dataclass
class Launch:
    """What running one contender produced, before its run folder is read."""

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


def launch(
    train_args: list[str],
    *,
    hosts: int,
    cluster: Any,
    env: dict[str, str],
    log_dir: Path,
    timeout_s: float,
    program: str = "rangerdl",
) -> Launch:
    """Run ``rangerdl train TRAIN_ARGS``: one process, in the netsim cluster, or plain torchrun.
    ``program="torchft"``: torchft's DiLoCo, one replica group per host (``benchmarks/peers``)."""
    target = ["-m", "rangerdl", "train", *train_args]
    log_dir.mkdir(parents=True, exist_ok=True)
    meter = CpuMeter()
    t0 = time.monotonic()
    if program == "torchft" and cluster is None:
        results = torchft_peer.run_loopback(
            train_args, hosts, env=env, log_dir=log_dir, timeout_s=timeout_s
        )
        bad = next((r for r in results if not r.ok), None)
        error = "" if bad is None else f"host {bad.host} rc {bad.returncode} killed {bad.killed}"
        error += f": {bad.stderr[-2000:]}" if bad is not None else ""
        return Launch(bad is None, error, time.monotonic() - t0, meter.others_share())
    if cluster is not None:
        tx = cluster.sent_bytes()
        if program == "torchft":
            results = torchft_peer.run_cluster(
                cluster, train_args, env=env, timeout_s=timeout_s, log_dir=log_dir
            )
        else:
            results = cluster.torchrun(target, env=env, timeout_s=timeout_s, log_dir=log_dir)
        failed = [r for r in results if not r.ok]
        error = ""
        if failed:
            r = failed[0]
            error = f"host {r.host} rc {r.returncode} killed {r.killed}: {r.stderr[-2000:]}"
        wall = time.monotonic() - t0
        share = meter.others_share()
        after = cluster.sent_bytes()
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


def prepare_data(workdir: Path, quick: bool, workloads: set[str]) -> None:
    """Prepare the built-in datasets once, before any host starts (not inside timed runs)."""
    os.environ["RANGERDL_CACHE"] = str(workdir / "cache")
    import torch

    from rangerdl.train.config import load_config
    from rangerdl.train.data import open_data
    from rangerdl.train.runtime import Runtime

    for name in sorted(workloads):
        w = p.WORKLOADS[name]
        cfg = load_config(w.config, [*w.args, *(w.quick if quick else ())])
        open_data(cfg.data, Runtime(0, 1, 0, torch.device("cpu"), None))


def periodic_batches(workload: str) -> int:
    """The workload's ``[train] eval_batches``: the run stage scores every point of a curve, the
    final one included, on these validation batches (0: the whole split)."""
    from rangerdl.train.config import load_config

    w = p.WORKLOADS[workload]
    return load_config(w.config, list(w.args)).train.eval_batches


# ---------------------------------------------------------------------------------- one run
class Runner:
    """Runs trainings of one workload on ``hosts`` hosts: in a netsim cluster at ``rate`` (None:
    no rate limit), or with ``netsim=False`` on loopback; ``cell`` names the rows it makes."""

    def __init__(
        self,
        workdir: Path,
        workload: str,
        hosts: int,
        rate: str | None,
        *,
        cell: str,
        netsim: bool = True,
        timeout_s: float = 3600.0,
    ) -> None:
        self.workdir, self.workload, self.hosts, self.rate = workdir, workload, hosts, rate
        self.cell, self.netsim, self.timeout_s = cell, netsim, timeout_s
        self.cluster: Any = None
        self.env = {"RANGERDL_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}

    def __enter__(self) -> Runner:
        if self.netsim:
            from netsim import Cluster

            self.cluster = Cluster(num_hosts=self.hosts, rate=self.rate).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def run_contender(self, c: p.Contender, lr: float, tag: str) -> dict[str, Any]:
        """Train ``c`` at ``lr`` once; its row (command, outcome, curve, counts)."""
        w = p.WORKLOADS[self.workload]
        name = f"{tag}-{c.name}"
        args = [*w.args, *c.overrides(lr), "--train.threads=1", f"--run.name={name}"]
        run_dir = self.workdir / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = reproduce_command(w.config, args, self.hosts, self.rate, self.netsim)
        if c.program == "torchft":
            config = os.path.relpath(w.config, REPO)
            command = torchft_peer.reproduce_command(
                [config, *args], self.hosts, self.rate, self.netsim
            )
        argv = [str(w.config), *args, f"--run.dir={self.workdir / 'runs'}"]
        print(f"  {c.name:<22} ", end="", flush=True)
        res = launch(
            argv,
            hosts=self.hosts,
            cluster=self.cluster,
            env=self.env,
            log_dir=self.workdir / "logs" / name,
            timeout_s=self.timeout_s,
            program=c.program,
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

    def run(
        self, entry: p.Entry, lr: float, seed: int, steps: int, stage: str, eval_every: int
    ) -> dict[str, Any]:
        """One run of the protocol: ``entry`` at ``lr``, ``seed``, a budget of ``steps``."""
        w = p.WORKLOADS[self.workload]
        budget: tuple[str, ...] = (f"--train.steps={steps}", f"--train.eval_every={eval_every}")
        if stage == "run":  # one metric along the whole curve: the final point on the same windows
            budget += (f"--train.final_eval_batches={periodic_batches(self.workload)}",)
        if p.QUICK:  # the workload's tiny sizes, keeping this budget
            budget = (*(a for a in w.quick if not a.startswith("--train.")), *budget)
        c = replace(entry.contender, extra=(*entry.contender.extra, *budget, f"--run.seed={seed}"))
        tag = f"{stage}-{self.cell}-lr{lr:.3g}-s{seed}-b{steps}"
        t0 = time.time()
        row = self.run_contender(c, lr, tag)
        row |= {"stage": stage, "cell": self.cell, "entry": entry.name, "lr": lr, "seed": seed}
        row |= {"steps_budget": steps, "started": t0, "eval_every": eval_every}
        return row


# ---------------------------------------------------------------------------------- storage
def load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"what": "time to DDP AdamW's quality: tuning, equal tokens, ladder", "runs": []}


def save_run(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    payload = load(path)
    payload["runs"] = [r for r in payload["runs"] if p.run_key(r) != p.run_key(row)] + [row]
    atomic_write_json(path, payload)
    return payload


# ---------------------------------------------------------------------------------- stages
def tune(names: list[str], workload: str, hosts: int, out: Path, redo: bool = False) -> None:
    """Stage 1: the lr grid of every entry in ``names``, seed TUNE_SEED, B steps, loopback;
    extended past an edge that wins (``protocol.next_lr``). Runs already in ``out`` are kept
    unless ``redo``."""
    steps = p.B[workload]
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-tune-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, p.QUICK, {workload})
        cell = p.tune_cell(workload, hosts)
        with Runner(workdir, workload, hosts, None, cell=cell, netsim=False) as runner:
            for name in names:
                e = p.ENTRIES[name]

                def trial(lr: float, e: p.Entry = e) -> dict[str, Any]:
                    key = ("tune", cell, e.name, lr, p.TUNE_SEED, steps)
                    rows = [r for r in load(out)["runs"] if p.run_key(r) == key and r.get("ok")]
                    if rows and not redo:
                        return rows[-1]
                    row = runner.run(e, lr, p.TUNE_SEED, steps, "tune", eval_every=steps)
                    save_run(out, row)
                    return row

                tried = {lr: trial(lr) for lr in p.tune_lrs(workload, e.contender.optimizer)}
                for _ in range(p.TUNE_EXTEND):
                    losses = {lr: r["final_val_loss"] for lr, r in tried.items() if r.get("ok")}
                    lr = p.next_lr(losses)
                    if lr is None:
                        break
                    tried[lr] = trial(lr)


def run_cell(
    spec: p.CellSpec,
    out: Path,
    redo: bool,
    tuning: Path | None = None,
    netsim: bool = True,
    entries: list[str] | None = None,
) -> None:
    """Stage 2 for one cell: DDP AdamW's target seeds (loopback, shared by the workload's
    cells), DDP with no rate limit (the cell's limit) and in the cell (its time), then every
    contender up the ladder, all of ``SEEDS`` at each rung, until the median of their times to
    target is finite (a rung past B where that has become impossible is cut short).
    Learning rates: the tuning winners in ``tuning`` (default: ``out``), found with 2 hosts.
    ``redo`` reruns the cell's runs (not the target seeds); ``netsim=False`` runs the cell on
    loopback with no rate limit (a smoke test of the stage); ``entries`` keeps only those
    contenders (DDP AdamW always runs)."""
    payload = load(tuning or out)
    if tuning is not None:  # carry the tuning runs along, so that `out` tells the whole story
        tuned = [r for r in payload["runs"] if r["stage"] == "tune"]
        mine = load(out)
        keep = {p.run_key(r) for r in tuned}
        mine["runs"] = [r for r in mine["runs"] if p.run_key(r) not in keep] + tuned
        atomic_write_json(out, mine)
    cells = {spec.key, spec.unlimited_key}
    if redo:  # a fresh cell: no run of an earlier invocation mixes into this one's analysis
        mine = load(out)
        mine["runs"] = [
            r
            for r in mine["runs"]
            if r["stage"] != "run" or r["cell"] not in cells or r["started"] >= REDO_SINCE
        ]
        atomic_write_json(out, mine)
    names = [n for n in spec.entries if n == "ddp_adamw" or not entries or n in entries]
    found = {n: p.tuned_lr(payload, spec.workload, 2, n) for n in names}
    missing = [n for n, lr in found.items() if lr is None]
    if missing:
        raise SystemExit(f"{spec.key}: no tuning runs for {', '.join(missing)}: run `tune` first")
    lrs = {n: lr for n, lr in found.items() if lr is not None}
    steps_b, every = p.B[spec.workload], p.EVAL_EVERY[spec.workload]

    def go(runner: Runner, entry: str, seed: int, steps: int) -> dict[str, Any]:
        key = ("run", runner.cell, entry, lrs[entry], seed, steps)
        rows = [r for r in load(out)["runs"] if p.run_key(r) == key and r.get("ok")]
        if redo and runner.cell in cells:  # only this invocation's runs count
            rows = [r for r in rows if r["started"] >= REDO_SINCE]
        if rows:
            return rows[-1]
        row = runner.run(p.ENTRIES[entry], lrs[entry], seed, steps, "run", every)
        save_run(out, row)
        return row

    def crossing(row: dict[str, Any], target: float) -> float | None:
        return p.time_to_target(row["curve"], target) if row.get("ok") else None

    with tempfile.TemporaryDirectory(prefix="rdl-ttq-run-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, p.QUICK, {spec.workload})
        w, h = spec.workload, spec.hosts
        with Runner(workdir, w, 2, None, cell=p.target_cell(w), netsim=False) as runner:
            finals = [go(runner, "ddp_adamw", s, steps_b) for s in p.TARGET_SEEDS]
        target = statistics.median(p.final_loss(r) for r in finals if r.get("ok"))
        with Runner(workdir, w, h, None, cell=spec.unlimited_key, netsim=netsim) as runner:
            go(runner, "ddp_adamw", 0, steps_b)  # the cell's limit: DDP with no rate limit
        with Runner(workdir, w, h, spec.rate, cell=spec.key, netsim=netsim) as runner:
            go(runner, "ddp_adamw", 0, steps_b)  # DDP's time in this cell
            for name in names[1:]:
                for steps in p.rung_steps(w, p.ENTRIES[name].k):
                    elsewhere = p.known_miss(load(out), spec, name, lrs[name], steps, target)
                    if steps != steps_b and elsewhere:
                        print(f"  {name:<22}  {steps} steps: misses in {elsewhere} (skipped)")
                        continue
                    times: dict[int, float | None] = {}
                    for seed in p.SEEDS:
                        never = sum(t is None for t in times.values())
                        if steps != steps_b and never > len(p.SEEDS) // 2:
                            break  # the median cannot be finite here (B runs every seed)
                        times[seed] = crossing(go(runner, name, seed, steps), target)
                    if p.median_time(times, p.SEEDS) is not None:
                        break


def seed_study(
    workload: str, runs: list[tuple[int, int, float]], out: Path, redo: bool = False
) -> None:
    """DDP AdamW at B steps on loopback with (initial-weights seed, data-order seed, lr) each:
    which of the two seeds, or the lr, makes a DDP seed end far from the others. Rows: stage
    ``seedstudy``, ``seed`` the init seed, ``data_seed`` the order's."""
    steps, every = p.B[workload], p.EVAL_EVERY[workload]
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-seeds-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, p.QUICK, {workload})
        cell = f"{workload}-2h-seedstudy"
        with Runner(workdir, workload, 2, None, cell=cell, netsim=False) as runner:
            for init, data, lr in runs:
                have = [
                    r
                    for r in load(out)["runs"]
                    if r["stage"] == "seedstudy"
                    and r["cell"] == cell
                    and (r["seed"], r["data_seed"], r["lr"]) == (init, data, lr)
                    and r.get("ok")
                ]
                if have and not redo:
                    continue
                e = p.ENTRIES["ddp_adamw"]
                e = replace(e, contender=replace(e.contender, extra=(f"--run.data_seed={data}",)))
                row = runner.run(e, lr, init, steps, "seedstudy", every)
                row["data_seed"] = data
                payload = load(out)
                payload["runs"] = [
                    r
                    for r in payload["runs"]
                    if not (
                        r["stage"] == "seedstudy"
                        and r["cell"] == cell
                        and (r["seed"], r.get("data_seed"), r["lr"]) == (init, data, lr)
                    )
                ] + [row]
                atomic_write_json(out, payload)


def _tuned_lrs(
    payload: dict[str, Any], spec: p.CellSpec, names: list[str], out: Path
) -> dict[str, float]:
    """Each entry's tuned lr (found with 2 hosts); exits naming an entry with no tuning runs."""
    lrs = {}
    for name in names:
        lr = p.tuned_lr(payload, spec.workload, 2, name)
        if lr is None:
            raise SystemExit(f"{name} has no tuning runs in {out}")
        lrs[name] = lr
    return lrs


def bound(spec: p.CellSpec, wanted: list[tuple[str, int]], out: Path, redo: bool) -> None:
    """Run contenders (entry, steps) of ``spec`` with every seed of ``SEEDS`` in its hosts with
    no rate limit (``spec.unlimited_key``; its tuned lr): what they reach when communication
    costs nothing but its latency (:func:`ttq.protocol.bounds`). ``redo`` reruns runs already in
    ``out``."""
    lrs = _tuned_lrs(load(out), spec, [name for name, _ in wanted], out)
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-bound-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, p.QUICK, {spec.workload})
        with Runner(workdir, spec.workload, spec.hosts, None, cell=spec.unlimited_key) as runner:
            for name, steps in wanted:
                for seed in p.SEEDS:
                    key = ("run", spec.unlimited_key, name, lrs[name], seed, steps)
                    done = [r for r in load(out)["runs"] if p.run_key(r) == key and r.get("ok")]
                    if done and not redo:
                        continue
                    every = p.EVAL_EVERY[spec.workload]
                    save_run(out, runner.run(p.ENTRIES[name], lrs[name], seed, steps, "run", every))


def recheck(spec: p.CellSpec, wanted: list[tuple[str, int]], out: Path, command: str) -> None:
    """Rerun committed runs (entry, steps; seed 0, tuned lr) of ``spec`` the same way and record
    their training times now and then under ``rechecks`` in ``out``: the machine is shared and
    its speed drifts between days, so new rows beside older ones are checked this way."""
    committed = load(out)
    lrs = _tuned_lrs(committed, spec, [name for name, _ in wanted], out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rdl-ttq-recheck-") as tmp:
        workdir = Path(tmp)
        prepare_data(workdir, p.QUICK, {spec.workload})
        with Runner(workdir, spec.workload, spec.hosts, spec.rate, cell=spec.key) as runner:
            for name, steps in wanted:
                every = p.EVAL_EVERY[spec.workload]
                row = runner.run(p.ENTRIES[name], lrs[name], 0, steps, "run", every)
                key = p.run_key(row)
                before = [r for r in committed["runs"] if p.run_key(r) == key and r.get("ok")]
                then = before[-1]["train_time_s"] if before else None
                now = row["train_time_s"] if row.get("ok") else None
                rows.append({"run": row, "committed_train_time_s": then, "train_time_s": now})
                ratio = f"{now / then:.3f}" if now and then else "-"
                print(f"{name} {steps} steps: {now} s now, {then} s committed, ratio {ratio}")
    payload = load(out)
    payload.setdefault("rechecks", []).append(
        {
            "what": "reruns of committed runs: the machine then and now",
            "command": command,
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"platform": platform.platform()},
            "cell": spec.key,
            "rows": rows,
        }
    )
    atomic_write_json(out, payload)
