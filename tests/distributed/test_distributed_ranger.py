"""Distributed Ranger / Lookahead on real processes (torchrun, gloo): the exact identities.

Each test launches ``worker.py`` under ``torchrun --standalone`` with a scenario and compares the
ranks' recorded trajectories with a reference computed here in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from problem import batch, flat, loss, make_inner, make_model

from rangerdl import Ranger

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _torchrun(out: Path, given: Any, nproc: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        str(TORCHRUN),
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(HERE / "worker.py"),
        str(out),
        json.dumps(given),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _key(spec: dict[str, Any], nproc: int) -> str:
    return f"w{nproc}-" + json.dumps(spec, sort_keys=True)


_BATCH_DIR: list[Path] = []
_BATCHED: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _batch_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    _BATCH_DIR[:] = [tmp_path_factory.mktemp("batched")]
    _BATCHED.clear()


def _run_batch(nproc: int) -> None:
    """Every scenario of ``SCENARIOS`` with ``nproc`` workers in one torchrun launch (one process
    group, one after another): a launch costs more than most scenarios."""
    todo = [(spec, n) for spec, n in SCENARIOS if n == nproc]
    names = {_key(spec, n): f"s{i}" for i, (spec, n) in enumerate(todo)}
    out = _BATCH_DIR[0] / f"w{nproc}"
    out.mkdir()
    proc = _torchrun(out, [[names[_key(spec, n)], spec] for spec, n in todo], nproc)
    for key, name in names.items():
        _BATCHED[key] = (
            proc
            if proc.returncode
            else [torch.load(out / name / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
        )


def launch(tmp_path: Path, spec: dict[str, Any], nproc: int = 2, ok: bool = True) -> Any:
    """Run the scenario; the per-rank records (or, with ``ok=False``, the failed process).
    Scenarios listed in ``SCENARIOS`` run in one shared launch per world size."""
    key = _key(spec, nproc)
    if ok and any(_key(s, n) == key for s, n in SCENARIOS):
        if key not in _BATCHED:
            _run_batch(nproc)
        result = _BATCHED[key]
        assert not isinstance(result, subprocess.CompletedProcess), result.stderr[-3000:]
        return result
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    proc = _torchrun(out, spec, nproc)
    if not ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def single_process_ranger(steps: int, **kwargs: Any) -> list[torch.Tensor]:
    model = make_model(0)
    opt = Ranger(model.parameters(), **kwargs)
    traj = []
    for step in range(steps):
        x, y = batch(0, step)
        opt.zero_grad()
        loss(model, x, y).backward()
        opt.step()
        traj.append(flat(model))
    return traj


ONE_WORKER_SYNCS = [{}, {"overlap": True, "overlap_steps": 3, "eager": True}]


def one_worker_spec(sync: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "ranger", "steps": 20, "lr": 0.05, "sync": sync}


@pytest.mark.parametrize("sync", ONE_WORKER_SYNCS, ids=["blocking", "eager"])
def test_one_worker_equals_single_process_ranger_bitwise(
    tmp_path: Path, sync: dict[str, Any]
) -> None:
    # eager overlap: the outer step is taken at launch with the worker's own weights, which with
    # one worker are the mean, so the late merge moves nothing
    (rec,) = launch(tmp_path, one_worker_spec(sync), nproc=1)
    ref = single_process_ranger(20, lr=0.05)
    assert all(torch.equal(a, b) for a, b in zip(rec["traj"], ref, strict=True))
    if not sync:
        assert rec["synced_equal"] == [True, True, True]


DIFFERENT_INIT = {"kind": "ranger", "steps": 1, "different_init": True}
SGD_K1 = {"kind": "sgd_lookahead", "k": 1, "alpha": 1.0, "steps": 12}
DDP_12 = {"kind": "ddp", "steps": 12}
WARMUP = {
    "kind": "sgd_lookahead",
    "k": 4,
    "alpha": 0.7,
    "steps": 12,
    "sync": {"outer_momentum": 0.9, "nesterov": True, "sync_every_warmup_steps": 12},
}
AVERAGED = {"k": 4, "steps": 16, "momentum": 0.9}


def test_parameters_start_identical_from_rank_zero(tmp_path: Path) -> None:
    recs = launch(tmp_path, DIFFERENT_INIT)
    assert not torch.equal(flat(make_model(0)), flat(make_model(1)))
    assert torch.equal(recs[0]["init"], flat(make_model(0)))
    assert torch.equal(recs[1]["init"], flat(make_model(0)))


def test_sgd_k1_alpha1_equals_ddp(tmp_path: Path) -> None:
    ours = launch(tmp_path, SGD_K1)
    ddp = launch(tmp_path, DDP_12)
    for r in range(2):
        for a, b in zip(ours[r]["traj"], ddp[r]["traj"], strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert all(ours[0]["synced_equal"])
    assert (ours[0]["traj"][-1] - ours[0]["init"]).abs().max() > 1e-2


def test_sync_every_warmup_averages_every_step_like_ddp(tmp_path: Path) -> None:
    # during the warm-up every step ends with plain averaging, whatever the outer step after it
    ours = launch(tmp_path, WARMUP)
    ddp = launch(tmp_path, DDP_12)
    for r in range(2):
        for a, b in zip(ours[r]["traj"], ddp[r]["traj"], strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_alpha1_without_momentum_equals_periodic_model_averager(tmp_path: Path) -> None:
    ours = launch(tmp_path, {"kind": "sgd_lookahead", "alpha": 1.0, **AVERAGED})
    torch_avg = launch(tmp_path, {"kind": "averager", **AVERAGED})
    for r in range(2):
        for a, b in zip(ours[r]["traj"], torch_avg[r]["traj"], strict=True):
            assert torch.allclose(a, b, atol=1e-7, rtol=0)
    # between syncs the ranks differ (local steps), right after them they agree
    assert not torch.equal(ours[0]["traj"][4], ours[1]["traj"][4])
    assert ours[0]["synced_equal"] == [True] * 4


SHARD_BASE = {"kind": "ranger", "steps": 14, "sync": {"outer_momentum": 0.5, "sync_every": 3}}
SHARDED = {**SHARD_BASE, "sync": {**SHARD_BASE["sync"], "shard_slow": True}}


@pytest.mark.parametrize("nproc", [2, 4])
def test_shard_slow_equals_unsharded(tmp_path: Path, nproc: int) -> None:
    plain = launch(tmp_path, SHARD_BASE, nproc=nproc)
    sharded = launch(tmp_path, SHARDED, nproc=nproc)
    for r in range(nproc):
        for a, b in zip(plain[r]["traj"], sharded[r]["traj"], strict=True):
            if nproc == 2:  # two-term sums are the same in any order: bitwise
                assert torch.equal(a, b)
            else:
                assert torch.allclose(a, b, atol=1e-6, rtol=0)
        assert all(sharded[r]["synced_equal"])
    full = plain[0]["comm"]["mem/outer_state_bytes"]
    assert sharded[0]["comm"]["mem/outer_state_bytes"] <= full / nproc + 64


OVERLAP_CASES = [
    (1, "fp32", False),
    (4, "fp32", False),
    (3, "bf16", False),
    (3, "fp32", True),
    (4, "bf16", True),
]


def overlap_spec(delay: int, comm_dtype: str, eager: bool) -> dict[str, Any]:
    sync = {"overlap": True, "sync_every": 4, "overlap_steps": delay, "comm_dtype": comm_dtype}
    return {"kind": "ranger", "steps": 18, "lr": 0.05, "sync": {**sync, "eager": eager}}


@pytest.mark.parametrize(("delay", "comm_dtype", "eager"), OVERLAP_CASES)
def test_overlap_equals_delayed_merge_simulation(
    tmp_path: Path, delay: int, comm_dtype: str, eager: bool
) -> None:
    world, k, alpha, steps, lr = 2, 4, 0.5, 18, 0.05
    recs = launch(tmp_path, overlap_spec(delay, comm_dtype, eager))

    # The simulation: W replicas in one process. At a sync step s each replica's weights are
    # snapshotted and averaged; after step s + delay phi moves toward that mean and each replica
    # becomes phi plus its own progress since the snapshot. With bf16 what is averaged is the
    # pseudo-gradient (snapshot - phi) rounded to bf16, summed in fp32 (at 2 workers the payloads
    # are all-gathered: the mean is not rounded again).
    # Eager: at the launch each replica takes the outer step with its own snapshot as the mean
    # and trains on from that estimate; the merge adds (phi_new - estimate).
    replicas = [make_model(0) for _ in range(world)]
    opts = [Ranger(m.parameters(), lr=lr, k=10**9) for m in replicas]  # no local Lookahead
    phi, pending, launched = flat(replicas[0]), None, 0
    for step in range(steps):
        for r, (m, opt) in enumerate(zip(replicas, opts, strict=True)):
            x, y = batch(r, step)
            opt.zero_grad()
            loss(m, x, y).backward()
            opt.step()
        count = step + 1
        if pending is not None and count - launched >= delay:
            mean, snapshots, estimates = pending
            phi = phi + alpha * mean if comm_dtype == "bf16" else phi.lerp(mean, alpha)
            for m, snap, est in zip(replicas, snapshots, estimates, strict=True):
                _set_flat(m, flat(m) + (phi - est) if eager else phi + (flat(m) - snap))
            pending = None
        if count % k == 0:
            snapshots = [flat(m) for m in replicas]
            if comm_dtype == "bf16":
                deltas = torch.stack([(s - phi).bfloat16().float() for s in snapshots])
                mean = deltas.sum(0) / world
            else:
                mean = torch.stack(snapshots).sum(0) / world
            estimates = [
                phi + alpha * (s - phi) if comm_dtype == "bf16" else phi.lerp(s, alpha)
                for s in snapshots
            ]
            if eager:
                for m, est in zip(replicas, estimates, strict=True):
                    _set_flat(m, est)
            pending, launched = (mean, snapshots, estimates), count
        for r in range(world):
            assert torch.allclose(recs[r]["traj"][step], flat(replicas[r]), atol=1e-6, rtol=0), (
                step,
                r,
            )
    assert not torch.equal(recs[0]["traj"][-1], recs[1]["traj"][-1])


def _set_flat(model: torch.nn.Module, values: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(values[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


FINISH_CASES = [
    (10, False, 3, "fp32"),
    (10, True, 3, "fp32"),
    (8, True, 2, "fp32"),
    (10, True, 3, "bf16"),
]


def finish_spec(steps: int, overlap: bool, comm_dtype: str) -> dict[str, Any]:
    sync = {"sync_every": 4, "overlap": overlap, "comm_dtype": comm_dtype}
    return {"kind": "ranger", "steps": steps, "finish": True, "sync": sync}


@pytest.mark.parametrize(
    ("steps", "overlap", "syncs", "comm_dtype"),
    FINISH_CASES,
    ids=[
        "partial-window",
        "overlap-partial-window",
        "overlap-launched-at-the-last-step",
        "bf16-overlap-partial-window",
    ],
)
def test_finish_leaves_every_rank_on_the_global_weights(
    tmp_path: Path, steps: int, overlap: bool, syncs: int, comm_dtype: str
) -> None:
    recs = launch(tmp_path, finish_spec(steps, overlap, comm_dtype))
    assert torch.equal(recs[0]["final"], recs[1]["final"])
    # 8 steps with overlap: the sync launched at step 8 is merged by finish(), and no more is needed
    assert recs[0]["comm"]["comm/syncs"] == syncs


FP32_12 = {"kind": "ranger", "steps": 12}
BF16_12 = {"kind": "ranger", "steps": 12, "sync": {"comm_dtype": "bf16"}}
RING = {"kind": "ranger", "steps": 12, "sync": {"sync_every": 4}}


def test_bf16_pseudo_gradients_halve_the_bytes_and_track_fp32(tmp_path: Path) -> None:
    fp32 = launch(tmp_path, FP32_12)
    bf16 = launch(tmp_path, BF16_12)
    assert all(bf16[0]["synced_equal"]) and all(bf16[1]["synced_equal"])
    assert (bf16[0]["traj"][-1] - fp32[0]["traj"][-1]).abs().max() < 2e-3
    assert not torch.equal(bf16[0]["traj"][-1], fp32[0]["traj"][-1])
    sync_fp32, sync_bf16 = fp32[0]["comm"]["comm/bytes"], bf16[0]["comm"]["comm/bytes"]
    assert sync_bf16 == pytest.approx(sync_fp32 / 2, rel=0.1)


def test_bytes_follow_the_ring_formula(tmp_path: Path) -> None:
    recs = launch(tmp_path, RING, nproc=4)
    numel = sum(p.numel() for p in make_model(0).parameters())
    per_sync = 2 * 3 / 4 * numel * 4
    assert recs[1]["comm"]["comm/syncs"] == 3
    for rank in range(4):
        assert recs[rank]["comm"]["comm/bytes"] == pytest.approx(3 * per_sync)
    assert recs[0]["comm"]["comm/broadcast_bytes"] == numel * 4  # rank 0's weights, once
    assert recs[1]["comm"]["comm/broadcast_bytes"] == 0


POLICIES = ["average", "broadcast", "local"]


def policy_spec(policy: str) -> dict[str, Any]:
    sync = {"sync_every": 4, "buffer_policy": policy}
    return {"kind": "ranger", "steps": 8, "batch_norm": True, "sync": sync}


@pytest.mark.parametrize("policy", POLICIES)
def test_buffer_policies(tmp_path: Path, policy: str) -> None:
    recs = launch(tmp_path, policy_spec(policy))
    at_sync = [
        [r["buffers"][3][i] for r in recs] for i in range(3)
    ]  # mean, var, num_batches_tracked
    between = [[r["buffers"][5][i] for r in recs] for i in range(2)]
    for values in at_sync[:2]:
        assert torch.equal(values[0], values[1]) == (policy != "local")
    assert torch.equal(at_sync[2][0], at_sync[2][1])  # equal step counts: equal num_batches_tracked
    assert not torch.equal(between[0][0], between[0][1])  # local batches in between


def test_mismatched_parameter_shapes_are_a_clear_error(tmp_path: Path) -> None:
    proc = launch(tmp_path, {"kind": "ranger", "steps": 2, "mismatch_shapes": True}, ok=False)
    assert proc.returncode != 0
    assert "disagree on parameters (names, shapes, dtypes)" in proc.stderr


def test_unequal_step_counts_are_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    spec = {
        "kind": "ranger",
        "steps": 6,
        "extra_steps_per_rank": 2,
        "finish": True,
        "sync": {"sync_every": 4},
    }
    proc = launch(tmp_path, spec, ok=False)
    assert proc.returncode != 0
    assert "ranks disagree on the number of optimizer steps" in proc.stderr


def test_options_that_cannot_combine_are_refused() -> None:
    from rangerdl.distributed import OuterSync, SyncOptions

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=r"call torch\.distributed\.init_process_group"):
        OuterSync(opt, None, SyncOptions(sync_every=2, outer_lr=0.5))
    with pytest.raises(ValueError, match="overlap and shard_slow cannot combine"):
        SyncOptions(overlap=True, shard_slow=True).validate()
    SyncOptions(overlap=True, comm_dtype="bf16").validate()  # the overlapped bf16 exchange
    with pytest.raises(ValueError, match="overlap_steps = 3 needs overlap = true"):
        SyncOptions(overlap_steps=3).validate()
    with pytest.raises(ValueError, match=r"overlap_steps \(9\) must be <= sync_every \(8\)"):
        SyncOptions(overlap=True, overlap_steps=9).resolved(k=8, alpha=0.5)
    with pytest.raises(ValueError, match="overlap_steps must be an int >= 1"):
        SyncOptions(overlap=True, overlap_steps=0).validate()


ATTACHED = ["ranger", "adamw", "sgd", "lion"]


def attach_spec(name: str) -> dict[str, Any]:
    return {"kind": "attach", "optimizer": name, "k": 3, "alpha": 0.5, "steps": 9, "lr": 0.01}


@pytest.mark.parametrize("name", ATTACHED)
def test_outer_sync_attaches_to_any_optimizer(tmp_path: Path, name: str) -> None:
    """One worker: OuterSync(optimizer) equals single-process Lookahead(optimizer) bit for bit;
    two workers: identical weights after every sync, the outer state in the state dict."""
    from rangerdl import Lookahead

    spec = attach_spec(name)
    (rec,) = launch(tmp_path, spec, nproc=1)
    model = make_model(0)
    ref: torch.optim.Optimizer
    if name == "ranger":  # distributed Ranger (Ranger(lookahead=False) + OuterSync) == Ranger
        ref = Ranger(model.parameters(), lr=0.01, k=3, alpha=0.5)
    else:
        ref = Lookahead(make_inner(name, model.parameters(), 0.01), k=3, alpha=0.5)
    for step in range(9):
        x, y = batch(0, step)
        ref.zero_grad()
        loss(model, x, y).backward()
        ref.step()
        assert torch.equal(rec["traj"][step], flat(model)), step
    recs = launch(tmp_path, spec)
    assert recs[0]["synced_equal"] == recs[1]["synced_equal"] == [True] * 3
    assert not torch.equal(recs[0]["traj"][1], recs[1]["traj"][1])  # local steps between syncs
    assert recs[0]["comm"]["comm/syncs"] == 3


def test_outer_sync_refuses_an_optimizer_with_its_own_slow_weights(tmp_path: Path) -> None:
    from rangerdl import Lookahead
    from rangerdl.distributed import OuterSync, SyncOptions

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        params = list(make_model(0).parameters())
        for opt in (Ranger(params), Lookahead(torch.optim.SGD(params, lr=0.1))):
            with pytest.raises(ValueError, match="keeps its own Lookahead slow weights"):
                OuterSync(opt, torch.distributed.group.WORLD, SyncOptions(sync_every=2))
        with pytest.raises(ValueError, match="give sync_every"):
            OuterSync(torch.optim.SGD(params, lr=0.1), torch.distributed.group.WORLD)
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_loop_example_runs_as_written(tmp_path: Path) -> None:
    """examples/distributed_loop.py, the README's distributed loop, under torchrun."""
    example = HERE.parents[1] / "examples" / "distributed_loop.py"
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", str(example)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(proc.stdout.split("2 workers: ")[1].split()[0])
    assert accuracy > 0.9


# Every scenario whose launch succeeds, by world size: run in one launch each (see ``launch``).
SCENARIOS: list[tuple[dict[str, Any], int]] = [
    *[(one_worker_spec(sync), 1) for sync in ONE_WORKER_SYNCS],
    *[(attach_spec(name), 1) for name in ATTACHED],
    *[(spec, 2) for spec in (DIFFERENT_INIT, SGD_K1, DDP_12, WARMUP, FP32_12, BF16_12)],
    ({"kind": "sgd_lookahead", "alpha": 1.0, **AVERAGED}, 2),
    ({"kind": "averager", **AVERAGED}, 2),
    *[(spec, n) for n in (2, 4) for spec in (SHARD_BASE, SHARDED)],
    *[(overlap_spec(*case), 2) for case in OVERLAP_CASES],
    *[(finish_spec(steps, overlap, dtype), 2) for steps, overlap, _, dtype in FINISH_CASES],
    *[(policy_spec(policy), 2) for policy in POLICIES],
    *[(attach_spec(name), 2) for name in ATTACHED],
    (RING, 4),
]
