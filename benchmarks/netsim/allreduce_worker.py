"""Time a gloo all-reduce; run under torchrun (netsim.py launches it on every host).

Rank 0 prints one line ``NETSIM {json}`` with the time of each timed all-reduce (the slowest rank's,
measured from a common barrier), after ``--warmup`` untimed ones that set up the connections.

    torchrun --standalone --nproc-per-node 2 benchmarks/netsim/allreduce_worker.py --mbytes 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mbytes", type=float, default=10.0, help="MB (1e6 bytes) of float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tensor = torch.empty(max(1, int(args.mbytes * 1e6) // 4), dtype=torch.float32)
    expected = world_size * (world_size + 1) / 2  # sum of rank + 1 over ranks
    times_s, correct = [], True
    for i in range(args.warmup + args.repeats):
        tensor.fill_(rank + 1)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        correct &= bool((tensor == expected).all())
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times_s.append(elapsed.item())
    flags = torch.tensor([int(correct)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        result = {
            "world_size": world_size,
            "mbytes": args.mbytes,
            "times_s": times_s,
            "median_s": statistics.median(times_s) if times_s else None,
            "correct": bool(flags.item()),
            "rank0_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "rank0_host": socket.gethostname(),
        }
        print("NETSIM " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
