"""Run by ``torchrun`` from ``test_teardown.py``: a user's loop in the README's pattern, ended
the way users end theirs, with every other thread of the process starved of CPU.

torchrun --standalone --nproc-per-node=W exit_worker.py '{"comm_dtype": "fp32", "end": "finish"}'

The starving makes a rare interleaving certain: a thread of gloo's runs only while the main thread
blocks, so it drops what it holds as late as it can, which at exit is during interpreter shutdown.
A rank must still exit 0. ``"end"``: ``"finish"`` (finish, then destroy the process group),
``"return"`` (nothing: the script just ends), ``"close"`` (close without finish, as after an
error), ``"gc"`` (the sync is dropped, never closed), ``"continue"`` (finish, train on, finish).
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


def main() -> None:
    spec = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
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
