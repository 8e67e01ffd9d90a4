"""Run by ``torchrun`` from the compression tests: several scenarios in one launch, results saved
per rank.

torchrun --standalone --nproc-per-node=W compression_worker.py OUT_DIR '{"exchange": {...}, ...}'

Scenarios (keys of the JSON spec, each optional):

- ``exchange``: ``exchange_mean`` of per-rank inputs (:func:`exchange_input`) for every codec in
  ``codecs``, every size in ``sizes`` and both modes (the all-to-all also with this rank's own
  chunk of the mean kept from its encoding); records the means and mean residuals.
- ``train``: a list of ``{"name", "sync", "steps", "lr", "model"}``: SGD inner steps under an
  ``OuterSync``; records the trajectory, whether ranks agree after each sync, the comm stats and
  the outer state.
- ``resume``: ``{"sync", "steps", "at"}``: trains ``steps`` steps, and again from the state saved
  after ``at`` steps by a fresh model, optimizer and ``OuterSync``; records both trajectories.
"""

from __future__ import annotations

import copy
import faulthandler
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from problem import batch, flat, loss
from torch import nn

from rangerdl.distributed import OuterSync, SyncOptions
from rangerdl.distributed.compression import Codec, blocking_on, exchange_mean


def exchange_input(rank: int, numel: int) -> torch.Tensor:
    """Rank ``rank``'s values for the exchange scenario (the test regenerates them)."""
    gen = torch.Generator().manual_seed(1000 * rank + numel)
    scale = torch.rand(numel, generator=gen) * 10 ** torch.randint(-3, 2, (numel,), generator=gen)
    return torch.randn(numel, generator=gen) * scale


def make_model(kind: str) -> nn.Module:
    """``problem``: the shared 83-parameter MLP; ``tiny``: the same plus a 1-value parameter (a
    tensor far smaller than a block)."""
    from problem import make_model as problem_model

    model = problem_model(0)
    if kind == "tiny":
        model.register_parameter("tiny", nn.Parameter(torch.tensor([0.25])))
    return model


def run_exchange(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    run = blocking_on(dist.group.WORLD)
    for name in spec["codecs"]:
        codec = Codec(name, spec.get("block_size", 4), spec.get("topk_density", 0.3))
        for numel in spec["sizes"]:
            chunk = -(-numel // world)
            x = torch.zeros(world * chunk)
            x[:numel] = exchange_input(rank, numel)
            sent = torch.empty(world, chunk)
            payload = codec.encode(x.view(world, chunk), dequantized=sent)
            # "own": this rank's chunk of the mean taken from its encoding (all-to-all), or its
            # payload's values from its encoding (all-gather), not decoded again
            modes = [(m, own) for m in ("all_to_all", "all_gather") for own in (False, True)]
            for mode, own in modes:
                residual = torch.full((chunk,), 0.01 * (rank + 1))
                mean = exchange_mean(
                    codec, payload, chunk, world, run, device=torch.device("cpu"),
                    mean_residual=residual, mode=mode, rank=rank if own else None,
                    own=sent if own else None,
                    out=torch.full((world * chunk,), float("nan")) if own else None,
                )  # fmt: skip
                key = f"{name}-{numel}-{mode}" + ("-own" if own else "")
                out[key] = {"mean": mean, "residual": residual}
    return out


def train(model: nn.Module, sync: OuterSync, opt: torch.optim.Optimizer, steps: range) -> list:
    traj = []
    rank = dist.get_rank()
    for step in steps:
        x, y = batch(rank, step)
        opt.zero_grad()
        loss(model, x, y).backward()
        opt.step()
        traj.append(flat(model))
    return traj


def build(entry: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer, OuterSync]:
    model = make_model(entry.get("model", "problem"))
    opt = torch.optim.SGD(model.parameters(), lr=entry.get("lr", 0.1))
    options = SyncOptions(**{"sync_every": 2, "outer_lr": 0.5, **entry["sync"]})
    return model, opt, OuterSync(opt, dist.group.WORLD, options)


def run_train(entry: dict[str, Any]) -> dict[str, Any]:
    model, opt, sync = build(entry)
    record: dict[str, Any] = {"traj": [], "synced_equal": []}
    period = sync.options.sync_every
    for step in range(entry["steps"]):
        record["traj"] += train(model, sync, opt, range(step, step + 1))
        if (step + 1) % period == 0 and not sync.options.overlap:
            digest = flat(model).double().sum().reshape(1)
            high, low = digest.clone(), digest.clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            record["synced_equal"].append(bool(high == low))
    sync.finish()
    record["final"] = flat(model)
    record["comm"] = sync.comm_stats()
    record["state"] = sync.state_dict()
    sync.close()
    return record


def run_resume(entry: dict[str, Any]) -> dict[str, Any]:
    model, opt, sync = build(entry)
    through = train(model, sync, opt, range(entry["at"]))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    through += train(model, sync, opt, range(entry["at"], entry["steps"]))
    sync.close()
    model, opt, sync = build(entry)  # a fresh job, loading the checkpoint
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    resumed = train(model, sync, opt, range(entry["at"], entry["steps"]))
    sync.close()
    return {"through": through, "resumed": resumed, "saved_outer": saved["opt"]["outer"]}


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    faulthandler.dump_traceback_later(150, exit=True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    record: dict[str, Any] = {}
    if "exchange" in spec:
        record["exchange"] = run_exchange(spec["exchange"], rank, world)
    for entry in spec.get("train", []):
        record[entry["name"]] = run_train(entry)
    if "resume" in spec:
        record["resume"] = run_resume(spec["resume"])
    torch.save(record, out / f"rank{rank}.pt")
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
