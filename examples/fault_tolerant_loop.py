"""Distributed Ranger on torchft: replica groups that can die and come back while the others train
on (``pip install "rangerdl[ft]"``). One Lighthouse, one process per replica group:

    rangerdl lighthouse --bind 127.0.0.1:29510 &
    python examples/fault_tolerant_loop.py --lighthouse 127.0.0.1:29510 --group 0 --groups 2 &
    python examples/fault_tolerant_loop.py --lighthouse 127.0.0.1:29510 --group 1 --groups 2

Kill one (``kill -9``) and start it again with the same command: the other goes on after the
Lighthouse's heartbeat timeout, and the restarted one heals from it at its first sync (slow
weights, its weights, the inner optimizer's state, the step and the data position).

Group ``i`` of ``N`` reads every ``N``-th batch of each epoch's permutation of the digits training
set, starting at batch ``i``: the groups read disjoint data, and a healed group goes on from the
position its peer had (the batches it missed while dead are not read by anyone this epoch).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rangerdl import Ranger
from rangerdl.distributed import SyncOptions
from rangerdl.distributed.ft import FaultTolerantSync, connect
from rangerdl.optim import use_slow_weights

BATCH = 32


def digits() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    parts = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=0)
    x_train, x_test, y_train, y_test = parts
    return (
        torch.tensor(x_train, dtype=torch.float32),
        torch.tensor(y_train),
        torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test),
    )


def batch_indices(num_samples: int, group: int, groups: int, position: int) -> torch.Tensor:
    """The samples group ``group`` of ``groups`` reads at its ``position``-th batch."""
    per_group = num_samples // BATCH // groups  # batches per epoch for each group
    epoch, i = divmod(position, per_group)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(epoch))
    start = (i * groups + group) * BATCH
    return order[start : start + BATCH]


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # every group starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lighthouse", required=True, help="HOST:PORT of `rangerdl lighthouse`")
    parser.add_argument("--group", type=int, required=True, help="this group's index")
    parser.add_argument("--groups", type=int, required=True, help="how many groups share the data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sync-every", type=int, default=6)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after a step")
    parser.add_argument("--save", type=Path, help="write the slow weights and counters here")
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = digits()
    net = model()
    optimizer = Ranger(net.parameters(), lr=3e-3, lookahead=False)  # the inner step
    position = {"batch": 0}  # the data position, handed to a group that heals

    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust logs: warnings only
    manager = connect(args.lighthouse, f"group{args.group}", hostname="127.0.0.1")
    sync = FaultTolerantSync(
        optimizer,
        manager,
        SyncOptions(sync_every=args.sync_every),
        user_state=(lambda: dict(position), position.update),
    )
    while sync.step < args.steps:
        rows = batch_indices(len(x_train), args.group, args.groups, position["batch"])
        loss = torch.nn.functional.cross_entropy(net(x_train[rows]), y_train[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # every sync_every steps: the sync through torchft (may heal)
        position["batch"] += 1
        print(f"step {sync.step} {time.monotonic():.3f}", flush=True)
        time.sleep(args.pause)
    with use_slow_weights(sync), torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    print(f"group {args.group}: test accuracy {accuracy:.4f}; {sync.comm_stats()}", flush=True)
    if args.save is not None:
        slow = torch.cat([s.reshape(-1) for _, s in sync.slow_weights()])
        state = {"slow": slow, "stats": sync.stats, "step": sync.step, **position}
        torch.save(state, args.save)
    sync.close()
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
