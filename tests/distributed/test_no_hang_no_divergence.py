"""Ranks that disagree fail at once with a clear error, never hang or diverge;
a multi-node elastic restart continues its run. Real processes under torchrun (gloo).

Each test says how the code before the fix failed it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
RANGERDL = Path(sys.executable).with_name("rangerdl")
TIMEOUT_S = 30  # the collective timeout the jobs here run with

CASES = {
    "uneven-k1-2-vs-1": {"case": "uneven", "k": 1, "steps": [2, 1]},
    "uneven-k6-7-vs-6": {"case": "uneven", "k": 6, "steps": [7, 6]},
    "add_param_group": {"case": "add_param_group", "k": 1},
    "param_order": {"case": "param_order"},
}


def worker_env(cache: Path | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # pytorch/pytorch#135712
    }
    if cache is not None:
        env["RANGERDL_CACHE"] = str(cache)
    return env


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rangerdl.data import prepare

    folder = tmp_path_factory.mktemp("cache")
    prepare("digits", folder / "digits")
    return folder


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """All optimizer-level cases in one 2-worker job (one launch: torch imports are the cost)."""
    out = tmp_path_factory.mktemp("agreement")
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc-per-node=2",
        str(HERE / "agreement_worker.py"),
        str(out),
        json.dumps(CASES),
    ]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", ["uneven-k1-2-vs-1", "uneven-k6-7-vs-6"])
def test_uneven_step_counts_are_the_same_clear_error_on_every_rank_at_once(
    outcomes: list[dict[str, Any]], case: str
) -> None:
    """Rank 0 takes one step more than rank 1, then ``finish()``. Before the fix the step counts
    were compared only when both ranks reached a sync: rank 0 waited in its sync (k=1) or in
    ``finish()`` (k=6) for a collective rank 1 never entered, until the 30 s timeout, then got an
    unrelated gloo message."""
    low, high = CASES[case]["steps"][1], CASES[case]["steps"][0]
    for rank, outcome in enumerate(outcomes):
        mine = outcome[case]
        assert mine["error"] is not None, f"rank {rank} got no error"
        assert "ranks disagree on the number of optimizer steps" in mine["error"]
        assert f"the ranks range from {low} to {high}" in mine["error"]
        assert mine["elapsed_s"] < TIMEOUT_S / 6, mine  # at once, not at the timeout


def test_add_param_group_after_attaching_is_a_clear_error_on_every_rank(
    outcomes: list[dict[str, Any]],
) -> None:
    """A group added after ``OuterSync`` is attached would never be synchronised. Before the fix
    it was accepted silently: every rank finished without error, holding a different ``b``."""
    for rank, outcome in enumerate(outcomes):
        error = outcome["add_param_group"]["error"]
        assert error is not None, f"rank {rank} finished with an unsynchronised param group"
        assert "add_param_group" in error and "before creating OuterSync" in error


def test_ranks_whose_parameters_come_in_another_order_are_refused_by_name(
    outcomes: list[dict[str, Any]],
) -> None:
    """Same shapes, another order on rank 1: compared by shape alone, the ranks averaged
    unrelated tensors without a word."""
    for rank, outcome in enumerate(outcomes):
        error = outcome["param_order"]["error"]
        assert error is not None, f"rank {rank} accepted parameters in another order"
        assert "rank 1 and rank 0 disagree on parameters" in error
        assert "'1.weight'" in error and "'0.weight'" in error, error


@pytest.mark.slow
@pytest.mark.parametrize(
    "rank1_extra",
    ["--distributed.sync_every=4", "--distributed.outer_lr=1.0", "--run.seed=3"],
    ids=["sync_every", "outer_lr", "seed"],
)
def test_ranks_given_different_configs_fail_at_once_naming_the_key(
    cache: Path, tmp_path: Path, rank1_extra: str
) -> None:
    """Rank 1 gets one more override than rank 0. Before the fix the configs were never compared:
    a different ``sync_every`` hung until ``timeout_s`` (then a gloo timeout), a different
    ``outer_lr`` exited 0 with ranks holding different global weights, a different seed exited 0
    with ranks reading different data orders."""
    wrap = tmp_path / "wrap.sh"
    wrap.write_text(
        '#!/bin/bash\nif [ "$RANK" = 1 ]; then exec "$@" $RANK1_EXTRA; else exec "$@"; fi\n'
    )
    wrap.chmod(0o755)
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc-per-node=2",
        "--no-python",
        str(wrap),
        str(RANGERDL),
        "train",
        "--model.name=mlp",
        "--train.steps=20",
        f"--distributed.timeout_s={TIMEOUT_S}",
        f"--run.dir={tmp_path / 'runs'}",
        "--run.name=t",
        "--log.tensorboard=false",
        "--log.progress=false",
    ]
    env = worker_env(cache) | {"RANK1_EXTRA": rank1_extra}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    key = rank1_extra.removeprefix("--").split("=")[0]
    assert f"given different configs: {key} differ" in out, out[-3000:]
    assert elapsed < TIMEOUT_S, elapsed  # startup included; a hang would take timeout_s more
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()  # nothing trained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_node_elastic_restart_after_kill_9_resumes_the_run(cache: Path, tmp_path: Path) -> None:
    """Two torchrun agents (nodes) of one job; ``kill -9`` of the worker with RANK=1 after the
    first checkpoint; both agents restart their workers. Before the fix the healthy node's
    agent restarted rank 0 with ``TORCHELASTIC_RESTART_COUNT=0`` (it counts per node,
    pytorch/pytorch#108158), which refused the existing run folder ("already exists") and the
    job failed. Now the folder records the torchrun job id, and a restart of the job continues."""
    runs = tmp_path / "runs"
    args = [
        f"--run.dir={runs}",
        "--run.name=el",
        # mlp with a sleep per step (tests/distributed/slow_models.py): the kill lands mid-run
        "--model.name=slow_models:slow_mlp",
        "--model.args.delay_s=0.02",
        "--train.steps=200",
        "--train.checkpoint_every=50",
        "--train.eval_every=0",
        "--train.threads=1",
        "--distributed.sync_every=100",  # DiLoCo-style: no collective between syncs
        "--log.tensorboard=false",
        "--log.progress=false",
    ]
    common = [
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id=el-{os.getpid()}",
        "--max-restarts=1",
    ]
    agents, logs = [], []
    for is_host in (1, 0):
        log = tmp_path / f"agent{is_host}.log"
        logs.append(log)
        cmd = [str(TORCHRUN), *common, f"--rdzv-conf=is_host={is_host}", str(RANGERDL), "train"]
        with open(log, "w") as fh:
            agents.append(
                subprocess.Popen(
                    [*cmd, *args], env=worker_env(cache), stdout=fh, stderr=subprocess.STDOUT
                )
            )
    try:
        deadline = time.monotonic() + 120
        while not (runs / "el" / "checkpoints" / "step-50").exists():
            assert all(a.poll() is None for a in agents), [p.read_text()[-2000:] for p in logs]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        victim = next(
            pid for a in agents for pid in children(a.pid) if env_of(pid).get("RANK") == "1"
        )
        os.kill(victim, signal.SIGKILL)
        codes = [a.wait(timeout=150) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    text = "\n".join(p.read_text() for p in logs)
    assert codes == [0, 0], text[-4000:]
    assert "resuming" in text and "already exists" not in text, text[-4000:]
    summary = json.loads((runs / "el" / "summary.json").read_text())
    assert summary["step"] == 200 and summary["world_size"] == 2

    from rangerdl.train.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(runs / "el") if "train/loss" in r]
    assert steps == list(range(1, 201))  # one history, no gaps or repeats


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)
