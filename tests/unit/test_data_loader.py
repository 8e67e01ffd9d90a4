"""SegmentedDataset + GlobalBatchSampler in a torch DataLoader: workers, resume, memory."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rangerdl.data import GlobalBatchSampler, SegmentedDataset, SegmentWriter, collate

N = 403  # awkward: prime, not a multiple of the batch


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> SegmentedDataset:
    """Sample i holds x = [i, i, i, i] and y = i, so a batch's content names its indices."""
    path = tmp_path_factory.mktemp("indexed")
    with SegmentWriter(
        path, {"x": ("float32", (4,)), "y": ("int64", ())}, segment_bytes=24 * 50
    ) as w:
        w.append(x=np.repeat(np.arange(N, dtype=np.float32)[:, None], 4, axis=1), y=np.arange(N))
    ds = SegmentedDataset(path)
    assert ds.num_segments == 9
    return ds


def loader_for(
    ds: SegmentedDataset, sampler: GlobalBatchSampler, num_workers: int, context: str | None = None
) -> DataLoader:
    return DataLoader(
        ds,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        multiprocessing_context=context if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )


def consume(
    ds: SegmentedDataset,
    sampler: GlobalBatchSampler,
    steps: int,
    workers: int = 0,
    context: str | None = None,
) -> list[list[int]]:
    """Run ``steps`` training steps: read each batch's labels, then advance the sampler."""
    out = []
    for batch in itertools.islice(loader_for(ds, sampler, workers, context), steps):
        assert torch.equal(batch["x"][:, 0].long(), batch["y"])  # rows stay intact
        out.append(batch["y"].tolist())
        sampler.advance(1)
    return out


def expected(sampler: GlobalBatchSampler, steps: int) -> list[list[int | None]]:
    return list(itertools.islice(iter(sampler), steps))


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_workers_read_the_sampler_order(indexed: SegmentedDataset, context: str) -> None:
    steps = 40  # past the end of epoch 0 (403 // 24 = 16 batches) into epoch 2
    make = lambda: GlobalBatchSampler(N, 24, seed=5, manifest_checksum=indexed.checksum)  # noqa: E731
    in_process = consume(indexed, make(), steps, workers=0)
    assert in_process == expected(make(), steps)
    assert consume(indexed, make(), steps, workers=2, context=context) == in_process


@pytest.mark.parametrize("cut", [0, 7, 16, 29])  # start, mid-epoch, epoch end, a later epoch
def test_resume_with_prefetching_workers_continues_exactly(
    indexed: SegmentedDataset, cut: int
) -> None:
    total = 40
    make = lambda: GlobalBatchSampler(N, 24, seed=8, manifest_checksum=indexed.checksum)  # noqa: E731
    reference = consume(indexed, make(), total)
    first = make()
    before = consume(indexed, first, cut, workers=2, context="fork")  # workers ran ahead
    state = json.loads(json.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    after = consume(indexed, second, total - cut, workers=2, context="fork")
    assert before + after == reference


def test_two_ranks_padded_epoch_sees_every_sample_once(indexed: SegmentedDataset) -> None:
    seen: list[int] = []
    num_pads = 0
    for rank in range(2):
        s = GlobalBatchSampler(N, 24, rank=rank, world_size=2, seed=1, drop_last=False)
        for batch in itertools.islice(loader_for(indexed, s, 0), s.batches_per_epoch):
            assert batch["x"].shape == (12, 4)
            mask = batch.get("mask", torch.ones(12, dtype=torch.bool))
            seen += batch["y"][mask].tolist()
            num_pads += int((~mask).sum())
    assert sorted(seen) == list(range(N)) and num_pads == -N % 24


def test_token_batches(tmp_path: Path) -> None:
    stream = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, np.uint8)
    with SegmentWriter(
        tmp_path, {"tokens": ("uint8", ())}, kind="tokens", seq_len=16, segment_bytes=500
    ) as w:
        w.append(tokens=stream)
    ds = SegmentedDataset(tmp_path)
    s = GlobalBatchSampler(len(ds), 8, seed=0)
    batch = next(iter(loader_for(ds, s, 0)))
    assert batch["x"].shape == batch["y"].shape == (8, 16) and batch["x"].dtype == torch.int64
    first = next(iter(s))[0]
    np.testing.assert_array_equal(batch["y"][0].numpy(), stream[first * 16 + 1 : first * 16 + 17])


RLIMIT_SCRIPT = """
import itertools, json, resource, sys
import numpy as np, torch
from torch.utils.data import DataLoader
from rangerdl.data import GlobalBatchSampler, SegmentedDataset, collate

torch.set_num_threads(1)
ds = SegmentedDataset(sys.argv[1])

def vm_data():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024

headroom = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_DATA, (vm_data() + headroom, resource.RLIM_INFINITY))
try:  # negative control: the limit is real
    np.ones(ds.nbytes // 8)
    sys.exit("allocating the dataset's size in RAM did not fail under the limit")
except MemoryError:
    pass
sampler = GlobalBatchSampler(len(ds), 256, seed=0)
total, count = 0, 0
for batch in itertools.islice(DataLoader(ds, batch_sampler=sampler, collate_fn=collate),
                              sampler.batches_per_epoch):
    assert torch.equal(batch["x"][:, 0].long(), batch["y"])
    total += int(batch["y"].sum())
    count += len(batch["y"])
    sampler.advance(1)
print(json.dumps({"count": count, "total": total, "epoch": sampler.epoch}))
"""


@pytest.mark.slow
def test_full_epoch_under_rlimit_data_below_dataset_size(tmp_path: Path) -> None:
    n, width = 48 * 1024, 1024  # 4 KiB per sample: 192 MiB of x
    chunk = 4096
    with SegmentWriter(tmp_path, {"x": ("float32", (width,)), "y": ("int64", ())}) as w:
        for start in range(0, n, chunk):
            idx = np.arange(start, start + chunk)
            w.append(x=np.broadcast_to(idx[:, None].astype(np.float32), (chunk, width)), y=idx)
    headroom = 48 << 20
    assert SegmentedDataset(tmp_path).nbytes > 4 * headroom
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RLIMIT_SCRIPT), str(tmp_path), str(headroom)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result == {"count": n, "total": n * (n - 1) // 2, "epoch": 1}
