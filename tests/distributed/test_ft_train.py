"""``rangerdl train`` with ``[distributed] backend = "torchft"``: replica groups of one process,
or torchrun jobs of several, each group with its own run folder. Every group ends on the same
slow weights; groups stopped together and started again resume from their checkpoints bit for
bit; a process of a group killed with SIGKILL takes its group down at once, torchrun restarts it,
and it heals from its live peer (step, data position, schedule) while the peer trains on; a
group given another config is refused, naming the key."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed_train import cache  # noqa: F401 - the fixture
from test_ft import lighthouse, serve_lighthouse  # noqa: F401 - the fixture

pytest.importorskip("torchft")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RANGERDL = Path(sys.executable).with_name("rangerdl")
SMALL = [
    "--model.name=mlp",
    "--model.args.hidden=32",
    "--data.batch_size=32",
    "--optim.k=4",
    "--train.eval_every=0",
    "--train.final_eval_batches=2",
    "--log.tensorboard=false",
    "--log.progress=false",
    "--distributed.backend=torchft",
    "--distributed.replica_groups=2",
    "--distributed.hostname=127.0.0.1",
]


def start(
    cache: Path,  # noqa: F811
    lighthouse: str,  # noqa: F811
    runs: Path,
    index: int,
    *args: str,
) -> subprocess.Popen[str]:
    env = {**os.environ, "RANGERDL_CACHE": str(cache), "OMP_NUM_THREADS": "1", "RUST_LOG": "warn"}
    cmd = [
        str(RANGERDL),
        "train",
        *SMALL,
        f"--run.dir={runs}",
        f"--distributed.replica_group={index}",
    ]
    cmd += [f"--distributed.lighthouse={lighthouse}", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def model_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"step-{step}" / "model.pt", weights_only=True)


def summary(run: Path) -> dict[str, float]:
    return json.loads((run / "summary.json").read_text())


def read_until_step(proc: subprocess.Popen[str], step: int, steps: int) -> list[str]:
    """``proc``'s output up to its first line that logs step ``step`` (of ``steps``) or later;
    asserts that it still runs then."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        found = re.search(rf"step (\d+)/{steps}", line)
        if found and int(found.group(1)) >= step:
            break
    assert proc.poll() is None, "".join(seen[-30:])
    return seen


def healed_onto_one_model(runs: Path, said: str, steps: int) -> None:
    """Group 1 (killed, started again) healed once from group 0, which never healed; both ended
    at ``steps`` with at most the sync it died in discarded, on the same slow weights (a
    BatchNorm-free MLP: the same model) and the same final loss."""
    sa, sb = summary(runs / "kill-group0"), summary(runs / "kill-group1")
    assert sb["comm/healed"] == 1 and sa["comm/healed"] == 0, said
    assert sa["step"] == sb["step"] == steps, said
    assert sa["comm/discarded"] <= 1, said
    assert same(model_at(runs / "kill-group0", steps), model_at(runs / "kill-group1", steps)), said
    assert sa["val/loss"] == sb["val/loss"], said


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


OVERLAP = ["--distributed.overlap=true", "--distributed.eager=true"]


@pytest.mark.parametrize(
    ("compression", "overlap"), [("none", False), ("int4", False), ("int4", True)]
)
def test_groups_end_on_one_model_and_resume_bit_for_bit(
    cache: Path,  # noqa: F811
    lighthouse: str,  # noqa: F811
    tmp_path: Path,
    compression: str,
    overlap: bool,
) -> None:
    """``int4``: the pseudo-gradients all-gathered as 4-bit payloads and summed in fp32, with
    error feedback, whose residual a checkpoint must carry for the resume to be exact.
    ``overlap`` (eager): each sync in flight for a step, merged at the next; the stop at step 8
    saves the one launched there, decided, and the resumed run merges it at step 9."""
    runs = tmp_path / "runs"
    extra = [f"--distributed.compression={compression}", *(OVERLAP if overlap else [])]
    # 18: the last sync is finish()'s
    whole = ["--run.name=whole", "--train.steps=18", *extra]
    outs = [finish(p) for p in [start(cache, lighthouse, runs, i, *whole) for i in range(2)]]
    a, b = runs / "whole-group0", runs / "whole-group1"
    said = "\n".join(out[-1500:] for out in outs)
    assert same(model_at(a, 18), model_at(b, 18)), said
    for run, index in ((a, 0), (b, 1)):
        s = summary(run)
        assert s["replica_group"] == index and s["replica_groups"] == 2, said
        # 4 syncs every k = 4 steps (overlapped: merged a step later), then finish()'s at 18
        assert s["comm/syncs"] == 5 and s["comm/discarded"] == 0 and s["comm/healed"] == 0, said
        if compression != "none":
            # 5 syncs of one row to the one peer: a 16-byte header, the config digests (4 B a
            # key, padded to 16) and the 4-bit payload
            from rangerdl.distributed.compression import payload_bytes

            params = sum(v.numel() for v in model_at(a, 18).values())
            digests = s["comm/bytes"] / 5 - 16 - payload_bytes(compression, params, 256, 0.03)
            assert digests % 16 == 0 and 0 < digests < 1024, said
    assert summary(a)["val/loss"] == summary(b)["val/loss"], said

    # stopped together at step 8, started again with the same commands: resumed from their
    # checkpoints (a named group continues its folder), bit for bit as the run that never stopped
    parts = ["--run.name=parts", "--train.steps=18", *extra]
    for extra in (["--train.stop_at=8"], []):
        procs = [start(cache, lighthouse, runs, i, *parts, *extra) for i in range(2)]
        outs = [finish(p) for p in procs]
    said = "\n".join(out[-1500:] for out in outs)
    assert "resuming" in outs[0] and "resuming" in outs[1], said
    if overlap:  # the stop saved the sync launched at step 8 in flight, decided
        saved = runs / "parts-group0" / "checkpoints" / "step-8" / "state-rank0.pt"
        assert "pending" in torch.load(saved, weights_only=True)["optimizer"]["outer"], said
    for index in range(2):
        assert same(model_at(runs / f"parts-group{index}", 18), model_at(a, 18)), said


def test_a_group_with_another_config_is_refused_naming_the_key(
    cache: Path,  # noqa: F811
    lighthouse: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    args = ["--run.name=odd", "--train.steps=8"]
    procs = [
        start(cache, lighthouse, runs, 0, *args),
        start(cache, lighthouse, runs, 1, *args, "--optim.lr=0.5"),
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode != 0, out[-2000:]
        assert "optim.lr differ" in out, out[-2000:]


TORCHRUN = Path(sys.executable).with_name("torchrun")


def start_torchrun(
    cache: Path,  # noqa: F811
    lighthouse: str,  # noqa: F811
    runs: Path,
    index: int,
    *args: str,
    groups: int = 2,
    restarts: int = 0,
) -> subprocess.Popen[str]:
    """Replica group ``index`` as a torchrun job of 2 processes (its own rendezvous)."""
    env = {
        **os.environ,
        "RANGERDL_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "RUST_LOG": "warn",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}"]
    cmd += ["-m", "rangerdl", "train"]
    cmd += [*SMALL, f"--distributed.replica_groups={groups}", f"--run.dir={runs}"]
    cmd += [f"--distributed.replica_group={index}", f"--distributed.lighthouse={lighthouse}"]
    return subprocess.Popen(
        [*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_groups(procs: list[subprocess.Popen[str]]) -> str:
    return "\n".join(finish(p) for p in procs)


@pytest.mark.long
def test_replica_groups_of_several_processes(
    cache: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two groups of two processes (torchrun jobs): each process a worker on its own quarter of
    the batch, rank r of each group exchanging chunk r of the group's mean. The same model as
    four groups of one process (the mean summed in another order: equal to rounding);
    ``shard_slow`` the same bit for bit, and it resumes bit for bit from per-process chunks;
    int4 with overlap and eager ends on one model and resumes bit for bit with a sync in flight.
    An MLP of 2485 parameters: chunks of 1243, the last one padded. Each Lighthouse waits for
    every group, so that no group that starts late syncs alone."""
    runs = tmp_path / "runs"
    base = ["--model.args.hidden=33", "--train.steps=18"]

    def pair(address: str, *args: str) -> str:
        return run_groups([start_torchrun(cache, address, runs, i, *args) for i in range(2)])

    def parts(address: str, name: str, *extra: str) -> str:
        for stop in (["--train.stop_at=8"], []):
            said = pair(address, *base, f"--run.name={name}", *extra, *stop)
            assert not stop or "stopped at step 8" in said, said
        assert "resuming" in said, said
        return said

    with serve_lighthouse(min_replicas=2) as two, serve_lighthouse(4) as four:
        said = pair(two, *base, "--run.name=plain")
        plain = model_at(runs / "plain-group0", 18)
        assert same(plain, model_at(runs / "plain-group1", 18)), said
        s = summary(runs / "plain-group1")
        assert (s["replica_group"], s["replica_groups"], s["world_size"]) == (1, 2, 2), said
        assert s["comm/syncs"] == 5 and s["comm/discarded"] == 0, said
        flat = ["--run.name=flat", "--distributed.replica_groups=4"]
        said = run_groups([start(cache, four, runs, i, *base, *flat) for i in range(4)])
        alone = model_at(runs / "flat-group3", 18)
        for key, value in plain.items():
            torch.testing.assert_close(value, alone[key], rtol=1e-5, atol=1e-6, msg=said)
        # each process sends its chunk, about half the bytes of a group of one
        assert s["comm/bytes"] < 0.6 * summary(runs / "flat-group0")["comm/bytes"], said

        said = parts(two, "sharded", "--distributed.shard_slow=true")
        for index in range(2):
            assert same(model_at(runs / f"sharded-group{index}", 18), plain), said

        packed = ["--distributed.compression=int4", *OVERLAP]
        said = pair(two, *base, "--run.name=packed", *packed)
        whole = model_at(runs / "packed-group0", 18)
        assert same(whole, model_at(runs / "packed-group1", 18)), said
        said = parts(two, "resumed", *packed)
    saved = runs / "resumed-group1" / "checkpoints" / "step-8" / "state-rank1.pt"
    assert "pending" in torch.load(saved, weights_only=True)["optimizer"]["outer"], said
    for index in range(2):
        assert same(model_at(runs / f"resumed-group{index}", 18), whole), said


def running(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def worker_pid(agent: subprocess.Popen[str], local_rank: int) -> int:
    """The pid of the torchrun agent's worker with ``LOCAL_RANK=local_rank``."""
    for task in Path(f"/proc/{agent.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"LOCAL_RANK={local_rank}".encode() in environ:
                    return int(pid)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under torchrun {agent.pid}")


@pytest.mark.long
def test_a_worker_killed_in_a_group_of_several_restarts_its_group_which_heals(
    cache: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Rank 1 of group 1 (a torchrun job with ``--max-restarts=1``) killed with SIGKILL: its
    rank 0 ends at once (torchrun would give it 30 s after a SIGTERM, all the while keeping the
    group in the quorum), torchrun restarts the group, and each of its processes heals from the
    same rank of group 0, which trains on: step, data position, schedule and state. Both end on
    one model. The syncs send 4-bit pseudo-gradients with error feedback, each in flight for a
    step, eager (the blocking uncompressed heal: test_ft.py; a group of one process restarted by
    the same command: the fault benchmark's quick test). Enough steps that group 0 trains on
    while group 1 restarts (imports take up to ~10 s on a busy machine). The Lighthouse waits up
    to 10 s for a group that has not asked for a quorum yet, so that two torchrun jobs started
    apart on a busy machine do not begin with quorums of their own (and one healing from the
    other)."""
    with serve_lighthouse(join_timeout_ms=10_000) as address:
        _kill_one_process(cache, address, tmp_path)


def _kill_one_process(cache: Path, address: str, tmp_path: Path) -> None:  # noqa: F811
    runs = tmp_path / "runs"
    args = ["--run.name=kill", "--train.steps=4000", "--train.log_every=10"]
    args += ["--distributed.compression=int4", *OVERLAP]
    a = start_torchrun(cache, address, runs, 0, *args)
    b = start_torchrun(cache, address, runs, 1, *args, restarts=1)
    seen = read_until_step(b, 40, 4000)
    survivor = worker_pid(b, 0)
    os.kill(worker_pid(b, 1), signal.SIGKILL)
    killed = time.monotonic()
    while running(survivor) and time.monotonic() - killed < 40:
        time.sleep(0.05)
    ended_after = time.monotonic() - killed
    out_b, out_a = finish(b), finish(a)
    said = f"{out_a[-2000:]}\n{''.join(seen[-20:])}{out_b[-3000:]}"
    healed_onto_one_model(runs, said, 4000)
    # the healed group's data position and schedule are its peer's: it logged the peer's steps
    logged = [int(s) for s in re.findall(r"step (\d+)/4000", out_b)]
    assert logged and logged[-1] == 4000, said
    # rank 0 of group 1 (blocked in a quorum that waits for its dead rank 1, where no signal
    # handler runs) ended long before torchrun's 30 s
    assert ended_after < 10, f"group 1's rank 0 lived {ended_after:.1f} s\n{said}"
