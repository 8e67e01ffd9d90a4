"""Every path that ends a distributed run leaves no live thread or process group and exits 0.

A rank that aborts at exit (SIGABRT, ``terminate called without an active exception``) fails
the whole torchrun job although training was done. ``exit_worker.py`` runs a user's loop with
every other thread of the process starved of CPU, which turns the rare late release of a gloo
work into a certain one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_worker(spec: dict, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", str(HERE / "exit_worker.py")]
    return subprocess.run(
        [*cmd, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=240
    )


@pytest.mark.parametrize(
    ("comm_dtype", "end", "nproc"),
    [
        ("fp32", "finish", 2),
        ("fp32", "return", 2),
        ("fp32", "close", 2),
        ("bf16", "finish", 4),
        ("bf16", "close", 2),
        ("bf16", "gc", 2),
        ("bf16", "continue", 2),
        ("fp32", "refused", 2),
        ("fp32", "objects", 3),
    ],
)
def test_every_end_of_an_overlapped_run_exits_cleanly_and_leaves_no_thread_or_group(
    comm_dtype: str, end: str, nproc: int
) -> None:
    proc = run_worker({"comm_dtype": comm_dtype, "end": end, "check": True}, nproc=nproc)
    out = proc.stdout + proc.stderr
    assert "terminate called" not in out, out[-3000:]
    assert "CHECK FAILED" not in out, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
