"""Run by ``torchrun`` from ``test_no_hang_no_divergence.py``: scenarios in which the ranks of a
distributed optimizer do not agree, run one after another in one process group; each rank saves its
outcome per scenario (the error it got, how long after its first step, its weights) as JSON.

torchrun --standalone --nproc-per-node=2 agreement_worker.py OUT_DIR '{"name": {"case": ...}}'

Cases: ``"uneven"`` (rank r takes ``steps[r]`` steps, then ``finish()``) and ``"add_param_group"``
(a group added after ``OuterSync`` is attached, then one step and ``finish()``) and
``"param_order"`` (rank 1 hands over its named parameters in another order, same shapes).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rangerdl.distributed import distributed_ranger

TIMEOUT_S = 30  # the collective timeout; a disagreement must be reported well before it


def run(case: dict[str, Any], rank: int) -> dict[str, Any]:
    if case["case"] == "param_order":
        return param_order(rank)
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    optimizer, sync = distributed_ranger([a], dist.group.WORLD, lr=0.1, k=case["k"])
    if case["case"] == "add_param_group":
        optimizer.add_param_group({"params": [b]})
    outcome: dict[str, Any] = {"error": None}
    t0 = time.monotonic()
    try:
        for _ in range(case.get("steps", [1, 1])[rank]):
            a.grad = torch.full_like(a, rank + 1.0)  # different per rank: a missed sync shows
            b.grad = torch.full_like(b, rank + 1.0)
            optimizer.step()
        sync.finish()
    except RuntimeError as exc:
        outcome["error"] = str(exc)
    outcome["elapsed_s"] = time.monotonic() - t0
    outcome["a"], outcome["b"] = a.tolist(), b.tolist()
    sync.close()
    return outcome


def param_order(rank: int) -> dict[str, Any]:
    """Two layers of one shape: only names tell rank 1's swapped order apart."""
    named = list(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).named_parameters()
    )
    if rank == 1:
        named = named[2:] + named[:2]
    try:
        _, sync = distributed_ranger(named, dist.group.WORLD, lr=0.1)
    except ValueError as exc:
        return {"error": str(exc)}
    sync.close()
    return {"error": None}


def main() -> None:
    out, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    faulthandler.dump_traceback_later(2 * TIMEOUT_S, exit=True)  # a hang: stacks, then exit
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    outcomes = {name: run(case, rank) for name, case in cases.items()}
    (out / f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
