"""Run by ``torchrun`` from the tests: one scenario, given as JSON, results saved per rank.

torchrun --standalone --nproc-per-node=W worker.py OUT_DIR '{"kind": "ranger", ...}'

Or several, one after another in the same process group (one launch instead of one each), each
saved under ``OUT_DIR/NAME``: ``worker.py OUT_DIR '[["NAME", {...}], ...]'``.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from problem import batch, flat, loss, make_inner, make_model
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from rangerdl.distributed import OuterSync, SyncOptions, distributed_ranger


def main() -> None:
    out, given = Path(sys.argv[1]), json.loads(sys.argv[2])
    scenarios = [(out / name, spec) for name, spec in given] if isinstance(given, list) else []
    # A hang shows where every thread was, then exits, well before the test's own timeout.
    faulthandler.dump_traceback_later(150 + 30 * len(scenarios), exit=True)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for folder, spec in scenarios or [(out, given)]:
        folder.mkdir(exist_ok=True)
        run(folder, spec)
    dist.barrier()
    dist.destroy_process_group()


def run(out: Path, spec: dict) -> None:
    """One scenario on the process group already set up; every rank saves ``out/rankR.pt``."""
    rank = dist.get_rank()
    model = make_model(
        seed=rank if spec.get("different_init") else 0,
        batch_norm=spec.get("batch_norm", False),
        hidden=8 + (rank if spec.get("mismatch_shapes") else 0),
    )
    kind, sync = spec["kind"], spec.get("sync", {})
    lr, steps = spec.get("lr", 0.05), spec["steps"] + (rank * spec.get("extra_steps_per_rank", 0))
    forward = model
    outer = None
    if kind == "ranger":  # the README's one line
        opt, outer = distributed_ranger(
            model.parameters(),
            dist.group.WORLD,
            SyncOptions(**sync),
            lr=lr,
            buffers=model.buffers(),
        )
    elif kind == "sgd_lookahead":
        inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=spec.get("momentum", 0.0))
        options = SyncOptions(sync_every=spec["k"], outer_lr=spec["alpha"], **sync)
        opt, outer = inner, OuterSync(inner, dist.group.WORLD, options)
    elif kind == "attach":  # OuterSync around any optimizer
        inner = make_inner(spec["optimizer"], model.parameters(), lr)
        options = SyncOptions(sync_every=spec["k"], outer_lr=spec["alpha"], **sync)
        opt, outer = inner, OuterSync(inner, dist.group.WORLD, options)
    elif kind == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(forward.parameters(), lr=lr)
    elif kind == "averager":
        averager = PeriodicModelAverager(period=spec["k"], warmup_steps=spec["k"] - 1)
        inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=spec.get("momentum", 0.0))
        opt = PostLocalSGDOptimizer(optim=inner, averager=averager)
    else:
        raise ValueError(kind)
    record: dict = {"init": flat(model), "traj": [], "synced_equal": [], "buffers": []}
    period = sync.get("sync_every", spec.get("k", 6))
    for step in range(steps):
        x, y = batch(rank, step, spec.get("per_rank", 8))
        opt.zero_grad()
        loss(forward, x, y).backward()
        opt.step()
        record["traj"].append(flat(model))
        record["buffers"].append([b.clone() for b in model.buffers()])
        if (
            kind in ("ranger", "sgd_lookahead", "attach")
            and not sync.get("overlap")
            and (step + 1) % period == 0
        ):
            # All ranks must hold identical weights right after a sync: compare a checksum.
            checksum = flat(model).double().sum().reshape(1)
            high, low = checksum.clone(), checksum.clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            record["synced_equal"].append(bool(high == low))
    if spec.get("finish"):
        outer.finish()
        record["final"] = flat(model)
    if outer is not None:
        record["comm"] = outer.comm_stats()
    torch.save(record, out / f"rank{rank}.pt")
    if outer is not None:
        outer.close()
    # Free DDP (its reducer holds the group) before the group: destroyed the other way round,
    # its teardown can wait forever on a thread of the dead group.
    del forward, opt, outer
    gc.collect()
    dist.barrier()


if __name__ == "__main__":
    main()
