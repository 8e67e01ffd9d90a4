"""Distributed Ranger in a plain PyTorch loop: each worker trains on its own share of the digits
data and syncs the slow weights every k steps. Run with

    torchrun --standalone --nproc-per-node=2 examples/distributed_loop.py
"""

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rangerdl.distributed import distributed_ranger
from rangerdl.optim import use_slow_weights

dist.init_process_group("gloo")  # torchrun sets the rank and world size
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(
    x / 16.0, y, test_size=0.25, stratify=y, random_state=0
)
x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
y_train, y_test = (torch.tensor(a) for a in (y_train, y_test))

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
# Named parameters: the ranks check at start that they agree on them by name, not only shape.
optimizer, sync = distributed_ranger(model.named_parameters(), dist.group.WORLD, lr=3e-3, k=6)
for epoch in range(30):
    # The same permutation everywhere; each rank takes every world-th batch of 32 (global batch 64).
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
    batches = order.split(32)[: len(order) // 32 // world * world]
    for idx in batches[rank::world]:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()  # every k-th step: one all-reduce moves the slow weights
sync.finish()  # every rank now holds the slow weights
with torch.no_grad(), use_slow_weights(sync):
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
if rank == 0:
    stats = sync.comm_stats()
    print(f"digits test accuracy, {world} workers: {accuracy:.4f}")
    print(f"sent per rank: {stats['comm/bytes'] / 1e6:.2f} MB in {stats['comm/syncs']:.0f} syncs")
sync.close()  # with overlap, its thread and side group; here a no-op, kept as the pattern
dist.barrier()  # no rank tears down while another still talks to it
dist.destroy_process_group()
