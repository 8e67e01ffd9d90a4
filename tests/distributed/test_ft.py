"""Distributed Ranger on torchft (``rangerdl.distributed.ft``), through
``examples/fault_tolerant_loop.py`` as the docs run it: one replica group is single-process Ranger
bit for bit, and a replica group killed with SIGKILL and restarted heals from its live peer while
the peer trains on; both end with the same slow weights, bit for bit."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("torchft")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fault_tolerant_loop.py"
RANGERDL = Path(sys.executable).with_name("rangerdl")
QUIET = {**os.environ, "RUST_LOG": "warn", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_lighthouse(min_replicas: int = 1, join_timeout_ms: int = 1000) -> Iterator[str]:
    """A Lighthouse on a free port; its address. ``min_replicas``: a quorum waits for that many
    groups (so that groups that start apart cannot form quorums of their own);
    ``join_timeout_ms``: how long a quorum waits for groups that have not asked yet."""
    address = f"127.0.0.1:{free_port()}"
    cmd = [str(RANGERDL), "lighthouse", f"--bind={address}", f"--min-replicas={min_replicas}"]
    cmd += [f"--join-timeout-ms={join_timeout_ms}", "--heartbeat-timeout-ms=2000"]
    proc = subprocess.Popen(
        cmd, env=QUIET, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("Lighthouse at "), line
    yield address
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.fixture
def lighthouse() -> Iterator[str]:
    with serve_lighthouse() as address:
        yield address


def group(
    lighthouse: str, index: int, groups: int, out: Path, steps: int, every: int, pause: float = 0.0
) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(EXAMPLE), f"--lighthouse={lighthouse}", f"--group={index}"]
    cmd += [f"--groups={groups}", f"--steps={steps}", f"--sync-every={every}"]
    cmd += [f"--pause={pause}", f"--save={out / f'group{index}.pt'}"]
    return subprocess.Popen(
        cmd, env=QUIET, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fault_tolerant_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_replica_group_is_single_process_ranger(lighthouse: str, tmp_path: Path) -> None:
    from rangerdl import Ranger

    out = finish(group(lighthouse, 0, 1, tmp_path, 12, 4))
    assert "test accuracy" in out
    saved = torch.load(tmp_path / "group0.pt", weights_only=True)
    assert saved["stats"]["syncs"] == 3 and saved["stats"]["discarded"] == 0

    ex = example()
    x, y, _, _ = ex.digits()
    net = ex.model()
    opt = Ranger(net.parameters(), lr=3e-3, k=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the group ran (OMP_NUM_THREADS=1): the same matmul rounding
    try:
        for position in range(12):
            rows = ex.batch_indices(len(x), 0, 1, position)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    expected = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    assert torch.equal(saved["slow"], expected)


@pytest.mark.long
def test_killed_replica_group_heals_from_its_peer_which_goes_on(
    lighthouse: str, tmp_path: Path
) -> None:
    # a's 240 steps take >= 24 s: time for b to die and start again (its imports took up to
    # ~10 s on a loaded machine) before a ends; a group that starts after its peers ended has
    # no one to heal from and trains alone
    steps, every, pause = 240, 4, 0.1
    a = group(lighthouse, 0, 2, tmp_path, steps, every, pause)
    b = group(lighthouse, 1, 2, tmp_path, steps, every, pause)
    assert b.stdout is not None
    for line in b.stdout:  # b trains with a for a while, then dies between two syncs
        # ">=": a group that started after the other healed at its first sync, and its step
        # jumped to the other's
        if re.match(r"step (\d+) ", line) and int(line.split()[1]) >= 10:
            break
    assert b.poll() is None, "b ended before it could be killed"
    b.kill()
    b.wait()
    out_b = finish(group(lighthouse, 1, 2, tmp_path, steps, every, pause))
    out_a = finish(a)
    a_state = torch.load(tmp_path / "group0.pt", weights_only=True)
    b_state = torch.load(tmp_path / "group1.pt", weights_only=True)
    said = f"a: {a_state['stats']}\n{out_a[-1500:]}\nb: {b_state['stats']}\n{out_b[-1500:]}"
    # the restarted group took its peer's state (step, data position) and both ended on one model
    assert b_state["stats"]["healed"] == 1, said
    assert a_state["step"] == b_state["step"] == steps, said
    assert b_state["batch"] == a_state["batch"], said
    assert torch.equal(a_state["slow"], b_state["slow"]), said
    # a went on: no pause longer than the Lighthouse's heartbeat timeout (2 s) and a quorum
    times = [float(t) for t in re.findall(r"(?m)^step \d+ ([\d.]+)$", out_a)]
    gaps = [t1 - t0 for t0, t1 in itertools.pairwise(times)]
    assert max(gaps) < 10.0, f"{max(gaps)}\n{said}"
    assert a_state["stats"]["discarded"] <= 1, said
