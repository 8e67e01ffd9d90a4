"""Run by ``torchrun`` from ``test_teardown.py``: a user's loop in the README's pattern, ended
the way users end theirs, with every other thread of the process starved of CPU.

torchrun --standalone --nproc-per-node=W exit_worker.py '{"comm_dtype": "fp32", "end": "finish"}'

The starving makes a rare interleaving certain: a thread of gloo's runs only while the main thread
blocks, so it drops what it holds as late as it can, which at exit is during interpreter shutdown.
A rank must still exit 0. ``"end"``: ``"finish"`` (finish, then destroy the process group),
``"return"`` (nothing: the script just ends), ``"close"`` (close without finish, as after an
error), ``"gc"`` (the sync is dropped, never closed), ``"continue"`` (finish, train on, finish),
``"refused"`` (the ranks hand over their parameters in different orders: the sync is refused
with a ValueError after an exchange of their descriptions; barrier, then destroy the process
group, as a script that reports the error and ends), ``"objects"`` (the trainer's object
collectives, then barrier and destroy).
With ``"check": true`` each end is followed by checks that no sync thread or group is left; a
failed check exits 3.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading

import torch
import torch.distributed as dist
from problem import batch, loss, make_model

from rangerdl.distributed import SyncOptions, distributed_ranger


def starve_other_threads() -> None:
    """Every thread but this one on CPU 0 at idle priority (Linux)."""
    me = threading.get_native_id()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid != me:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def sync_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("rangerdl-sync")]


def groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def check(what: str, ok: bool) -> None:
    if not ok:
        print(f"CHECK FAILED: {what}: threads {sync_threads()}, groups {groups()}", flush=True)
        sys.exit(3)


def train(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, rank: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        loss(model, *batch(rank, step)).backward()
        opt.step()


def refused(rank: int) -> None:
    """Two layers of one shape, rank 1's in the other order: only the names differ."""
    named = list(make_model(0).named_parameters())
    if rank == 1:
        named = named[2:] + named[:2]
    try:
        distributed_ranger(named, dist.group.WORLD, lr=0.01)
    except ValueError as e:
        check("the refusal names the parameters", "parameters" in str(e))
    else:
        check("a refusal", False)


def objects(rank: int) -> None:
    from rangerdl.distributed.release import all_gather_object, broadcast_object

    world = dist.get_world_size()
    everyone = all_gather_object({"rank": rank, "pad": "x" * (100 * rank)})
    check(
        "all_gather_object", everyone == [{"rank": r, "pad": "x" * (100 * r)} for r in range(world)]
    )
    check("broadcast_object", broadcast_object(("from", rank)) == ("from", 0))


def main() -> None:
    spec = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    if spec["end"] in ("refused", "objects"):
        starve_other_threads()
        (refused if spec["end"] == "refused" else objects)(rank)
        dist.barrier()
        dist.destroy_process_group()
        return
    model = make_model(0)
    options = SyncOptions(
        sync_every=4,
        overlap=True,
        overlap_steps=2,
        comm_dtype=spec["comm_dtype"],
        eager=spec.get("eager", True),
    )
    opt, sync = distributed_ranger(model.parameters(), dist.group.WORLD, options, lr=0.01)
    if spec.get("starve", True):
        starve_other_threads()
    train(opt, model, 10, rank)
    end, checking = spec["end"], spec.get("check", False)
    if end in ("finish", "continue"):
        sync.finish()
        if checking:
            check("after finish()", not sync_threads() and groups() == 1)
    if end == "continue":  # training goes on after finish(): syncs again, then ends cleanly
        train(opt, model, 10, rank)
        sync.finish()
        if checking:
            check("after the second finish()", not sync_threads() and groups() == 1)
    if end == "close":
        sync.close()
        if checking:
            check("after close()", not sync_threads() and groups() == 1)
    if end == "gc":
        del opt, sync
        gc.collect()
        if checking:
            check("after garbage collection", not sync_threads() and groups() == 1)
    if end != "return":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
