"""Ctrl-C and SIGTERM keep the work: the step finishes, every rank writes the same checkpoint,
the exit code says which signal, and the resumed run equals one that never stopped, bit for bit.
Across ranks a stop is honoured within seconds whatever ``sync_every`` is, and every rank gives
the one reason. Real signals, on 1 and on 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed_train import TINY, cache, torchrun  # noqa: F401 - the fixture

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Long enough that a signal sent on seeing an early step lands before the end on an idle machine
# too (1200 steps took 1.7 s there: a run could finish between the test seeing step 60 and its
# kill, and exit 0).
LAST = 4000
STEPS = [f"--train.steps={LAST}", "--train.checkpoint_every=0", "--train.eval_every=0"]


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen[str]) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file():
            # Whole lines only: the run may be writing the last one right now.
            lines = [x for x in metrics.read_text().split("\n")[:-1] if x.strip()]
            if lines and json.loads(lines[-1]).get("step", 0) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within the deadline (rc {proc.poll()})")


def _states(run: Path, world: int, step: int) -> list[dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step-{step}"
    return [
        torch.load(folder / f"state-rank{r}.pt", weights_only=True)["model"] for r in range(world)
    ]


def _compare_at(cut: int) -> str:
    """Where the resumed and the straight run stop to be compared: a few steps past the cut (a
    ``stop_at``, not the end of the schedule: the equality does not need the other ~4000 steps
    twice)."""
    return f"--train.stop_at={cut + 20}"


def test_ctrl_c_checkpoints_and_the_resumed_run_is_bitwise_identical(
    cache: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    env = {**os.environ, "RANGERDL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "rangerdl", "train", *TINY, *STEPS, "--train.threads=1"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*base, f"--run.dir={cut}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_step(cut / "t", 100, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "SIGINT: stopping" in out
    assert f"continue with: rangerdl train --resume {cut / 't'}" in out
    done = [p.name for p in (cut / "t" / "checkpoints").iterdir()]
    assert len(done) == 1, done
    at = int(done[0].split("-")[1])
    assert 100 <= at < LAST
    stop = _compare_at(at)
    resumed = subprocess.run(
        [sys.executable, "-m", "rangerdl", "train", "--resume", str(cut / "t"), stop],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    whole = subprocess.run(
        [*base, f"--run.dir={straight}", stop], env=env, capture_output=True, text=True, timeout=240
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    (a,), (b,) = _states(cut / "t", 1, at + 20), _states(straight / "t", 1, at + 20)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _workers(proc: subprocess.Popen[str]) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    workers = [int(pid) for pid in out.split()]
    assert len(workers) == 2
    return workers


def _checkpoint_step(run: Path) -> int:
    done = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(done) == 1, done
    return int(done[0].split("-")[1])


def test_sigterm_on_two_ranks_stops_both_at_one_step(cache: Path, tmp_path: Path) -> None:  # noqa: F811
    """Preemption: every worker gets SIGTERM; they agree on one step (between syncs too),
    write one checkpoint, and the resumed job equals an uninterrupted one."""
    args = [*TINY, *STEPS, "--distributed.sync_every=4"]
    cut = tmp_path / "cut"
    proc = torchrun(cache, [*args, f"--run.dir={cut}"], wait=False)
    _wait_for_step(cut / "t", 60, proc)
    for pid in _workers(proc):
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert out.count("SIGTERM: stopping") == 2, out[-3000:]
    assert out.count("(SIGTERM); continue with") == 2, out[-3000:]
    at = _checkpoint_step(cut / "t")
    assert 60 <= at < LAST
    torchrun(cache, ["--resume", str(cut / "t"), _compare_at(at)])
    straight = tmp_path / "straight"
    torchrun(cache, [*args, f"--run.dir={straight}", _compare_at(at)])
    ends = _states(cut / "t", 2, at + 20), _states(straight / "t", 2, at + 20)
    for a, b in zip(*ends, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_is_honoured_within_seconds_whatever_sync_every_is(
    cache: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A ``sync_every`` far above DiLoCo's 500: the ranks stop within seconds of SIGTERM, long
    before the next sync, with one checkpoint; a rank that got no signal itself stops for the same
    reason, and says so."""
    # Steps of a few ms: the next sync is far away in time, whatever the machine's speed.
    steps = ["--train.steps=40000", "--train.checkpoint_every=0", "--train.eval_every=0"]
    args = [*TINY, *steps, "--distributed.sync_every=20000", "--train.log_every=1"]
    run = tmp_path / "cut"
    proc = torchrun(cache, [*args, f"--run.dir={run}"], wait=False)
    _wait_for_step(run / "t", 40, proc)
    sent = time.monotonic()
    os.kill(max(_workers(proc)), signal.SIGTERM)  # one rank only
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode != 0, out[-3000:]
    assert out.count("SIGTERM: stopping") == 1, out[-3000:]
    assert out.count("(SIGTERM); continue with") == 2, out[-3000:]
    assert "(stop_at)" not in out, out[-3000:]
    assert 40 <= _checkpoint_step(run / "t") < 20000  # not held until the next sync
    assert took < 60, took  # signal to exit, checkpoint and process teardown included
