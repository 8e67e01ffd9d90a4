"""Two real processes (``torchrun --standalone``, gloo) read disjoint samples that cover an epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rangerdl.data import GlobalBatchSampler, SegmentWriter

N, G = 203, 16

WORKER = """
import itertools, json, sys
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from rangerdl.data import GlobalBatchSampler, SegmentedDataset, collate

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ds = SegmentedDataset(sys.argv[1])
sampler = GlobalBatchSampler(len(ds), int(sys.argv[2]), rank=rank, world_size=world, seed=3,
                             drop_last=False, manifest_checksum=ds.checksum)
loader = DataLoader(ds, batch_sampler=sampler, num_workers=1, collate_fn=collate)
steps = []
for batch in itertools.islice(loader, sampler.batches_per_epoch):
    mask = batch.get("mask", torch.ones(len(batch["y"]), dtype=torch.bool))
    assert torch.equal(batch["x"][:, 0].long(), batch["y"])
    steps.append(batch["y"][mask].tolist())   # what this process read, by content
    sampler.advance(1)
gathered = [None] * world
dist.all_gather_object(gathered, {"rank": rank, "steps": steps, "state": sampler.state_dict()})
if rank == 0:
    with open(sys.argv[3], "w") as fh:
        json.dump(gathered, fh)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_torchrun_processes_read_disjoint_samples(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with SegmentWriter(data, {"x": ("float32", (3,)), "y": ("int64", ())}, segment_bytes=400) as w:
        w.append(x=np.repeat(np.arange(N, dtype=np.float32)[:, None], 3, axis=1), y=np.arange(N))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = (
        [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    command = [
        *launcher, "--standalone", "--nproc-per-node=2", str(script), str(data), str(G), str(result),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(result.read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    first, second = ranks[0]["steps"], ranks[1]["steps"]
    assert len(first) == len(second) == -(-N // G)  # both ranks took every step
    flat0 = [i for step in first for i in step]
    flat1 = [i for step in second for i in step]
    assert not set(flat0) & set(flat1)
    assert sorted(flat0 + flat1) == list(range(N))  # the epoch, each sample once
    # Per step the two halves are exactly the single-process global batch.
    single = GlobalBatchSampler(N, G, seed=3, drop_last=False)
    for step, expected in enumerate(iter(single)):
        if step == len(first):
            break
        assert first[step] + second[step] == [i for i in expected if i is not None]
    assert ranks[0]["state"] == ranks[1]["state"] and ranks[0]["state"]["epoch"] == 1
