"""``torchrun -m rangerdl train`` with 2 workers: bitwise resume and an elastic restart after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rangerdl.data import prepare

    folder = tmp_path_factory.mktemp("cache")
    prepare("digits", folder / "digits")
    return folder


def torchrun(cache: Path, args: list[str], *extra: str, wait: bool = True) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "RANGERDL_CACHE": str(cache),
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        # torchrun restarts: a fresh rendezvous store per attempt (pytorch/pytorch#135712)
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc-per-node=2",
        *extra,
        "-m",
        "rangerdl",
        "train",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if wait:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-4000:]
    return proc


TINY = [
    "--model.name=mlp",
    "--model.args.hidden=32",
    "--optim.lr=0.1",
    "--data.batch_size=32",
    "--train.eval_every=10",
    "--train.eval_batches=2",
    "--log.tensorboard=false",
    "--log.progress=false",
    "--run.name=t",
]


def final(run: Path, step: int) -> list[dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step-{step}"
    return [torch.load(folder / f"state-rank{r}.pt", weights_only=True)["model"] for r in range(2)]


def train_losses(run: Path) -> list[tuple[int, float]]:
    from rangerdl.train.metrics import read_metrics

    return [(r["step"], r["train/loss"]) for r in read_metrics(run) if "train/loss" in r]


@pytest.mark.parametrize(
    ("overlap", "delay", "comm_dtype", "eager"),
    [
        (False, 1, "fp32", False),
        (True, 1, "fp32", False),
        (True, 4, "fp32", False),
        (True, 4, "bf16", True),
    ],
)
def test_resume_is_bitwise_identical(
    cache: Path, tmp_path: Path, overlap: bool, delay: int, comm_dtype: str, eager: bool
) -> None:
    # Stop at step 18 = a sync step (sync_every 6): with overlap the all-reduce is still in
    # flight at the checkpoint (and is merged `delay` steps later), and the resumed run must
    # merge it exactly as the straight run did.
    common = [*TINY, "--train.steps=30", "--train.checkpoint_every=0", "--distributed.sync_every=6"]
    common.append(f"--distributed.overlap={str(overlap).lower()}")
    common.append(f"--distributed.overlap_steps={delay}")
    common.append(f"--distributed.comm_dtype={comm_dtype}")
    common.append(f"--distributed.eager={str(eager).lower()}")
    torchrun(cache, [f"--run.dir={tmp_path / 'a'}", *common])
    torchrun(cache, [f"--run.dir={tmp_path / 'b'}", *common, "--train.stop_at=18"])
    torchrun(cache, ["--resume", str(tmp_path / "b" / "t")])
    assert train_losses(tmp_path / "a" / "t") == train_losses(tmp_path / "b" / "t")
    for a, b in zip(final(tmp_path / "a" / "t", 30), final(tmp_path / "b" / "t", 30), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ranks = final(tmp_path / "a" / "t", 30)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # final sync: one model


def test_elastic_restart_after_kill_9_completes_from_the_checkpoint(
    cache: Path, tmp_path: Path
) -> None:
    args = [
        *TINY,
        "--model.name=slow_models:slow_mlp",
        "--train.steps=60",
        "--train.checkpoint_every=10",
        f"--run.dir={tmp_path / 'runs'}",
    ]
    args.remove("--model.args.hidden=32")
    run = tmp_path / "runs" / "t"
    proc = torchrun(cache, args, "--max-restarts=1", wait=False)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step-20").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    workers = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert "restart" in out.lower() or "Restarting" in out
    summary = (run / "summary.json").read_text()
    assert '"step": 60' in summary
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, 61))  # one history, no gaps or repeats

    # And the restarted job equals one that never failed.
    straight = [a for a in args if not a.startswith("--run.dir")] + [
        f"--run.dir={tmp_path / 'straight'}"
    ]
    torchrun(cache, straight)
    assert train_losses(tmp_path / "straight" / "t") == losses
