"""Memory and speed of the segmented data layer (``rangerdl.data``).

1. Per-process ``RssAnon`` (``/proc/PID/status``; RSS would count the page cache of the maps)
   during a full epoch over synthetic datasets (default 256 MiB, 1 GiB, 4 GiB of float32
   ``3x32x32`` samples), in the main process with ``num_workers=0`` and in each of 2 DataLoader
   workers. Growth = highest reading minus the reading after the first 10 batches; target: below
   5% of the smallest dataset.
2. Samples/s of ``SegmentedDataset`` + ``collate`` against an in-RAM ``TensorDataset`` + torch's
   default collate, over the same global batches (``GlobalBatchSampler``, batch 256,
   ``num_workers=0``), interleaved, median of the repeats; target: at least 0.9x. Also shown:
   the per-sample ``__getitem__`` path (a dataset without ``__getitems__``).
3. Seconds and peak ``RssAnon`` (sampled every 10 ms from outside) to build the order of 10^8
   samples file-backed, against numpy's in-RAM ``permutation``.

Each measurement runs in a fresh child process. Prints a table and writes
``benchmarks/results/data_loader.json`` (with the command that produced it).

    python benchmarks/data_loader.py [--sizes-mib 256 1024 4096] [--order-samples 100000000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_SHAPE = (3, 32, 32)
SAMPLE_BYTES = 4 * 3 * 32 * 32 + 8  # x float32 + y int64
BATCH = 256
WARMUP_BATCHES = 10


def rss_anon_mib(pid: int | str = "self") -> float:
    """``RssAnon`` of a process in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def run_child(*args: str, monitor: bool = False) -> dict[str, Any]:
    """Run this script as ``--child ...``; with ``monitor``, also sample its RssAnon peak."""
    command = [sys.executable, __file__, "--child", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    if monitor:
        while proc.poll() is None:
            peak = max(peak, rss_anon_mib(proc.pid))
            time.sleep(0.01)
    out, _ = proc.communicate(timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if monitor:
        result["peak_rss_anon_mib"] = peak
    return result


# ---- children -------------------------------------------------------------------------------


def child_epoch(path: str, num_workers: int) -> dict[str, Any]:
    """Iterate one epoch; sample RssAnon of this process and of each worker ~400 times."""
    import torch
    from torch.utils.data import DataLoader

    from rangerdl.data import GlobalBatchSampler, SegmentedDataset, collate

    torch.set_num_threads(1)
    ds = SegmentedDataset(path)
    sampler = GlobalBatchSampler(len(ds), BATCH, seed=0, manifest_checksum=ds.checksum)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)
    it = iter(loader)
    # The loader's worker processes (a private attribute; fine for a benchmark).
    pids = [w.pid for w in getattr(it, "_workers", [])]
    names = ["main"] + [f"worker {k}" for k in range(len(pids))]
    readings: dict[str, list[float]] = {name: [] for name in names}
    num_batches = sampler.batches_per_epoch
    warmup = min(WARMUP_BATCHES, num_batches // 4)
    every = max(1, num_batches // 400)
    start = time.perf_counter()
    count = 0
    for step, batch in enumerate(itertools.islice(it, num_batches)):
        count += len(batch["y"])
        sampler.advance(1)
        if step >= warmup and (step % every == 0 or step == num_batches - 1):
            for name, pid in zip(names, ["self", *pids], strict=True):
                readings[name].append(rss_anon_mib(pid))
    seconds = time.perf_counter() - start
    assert count == sampler.batches_per_epoch * BATCH and sampler.epoch == 1
    return {
        "num_samples": len(ds),
        "seconds": seconds,
        "processes": {
            name: {"start": r[0], "end": r[-1], "peak": max(r), "growth": max(r) - r[0]}
            for name, r in readings.items()
        },
    }


def child_throughput(path: str, repeats: int) -> dict[str, Any]:
    """Samples/s of three readers over the same batches, interleaved round-robin."""
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from rangerdl.data import GlobalBatchSampler, SegmentedDataset, collate

    torch.set_num_threads(1)
    ds = SegmentedDataset(path)
    sampler = GlobalBatchSampler(len(ds), BATCH, seed=0)
    batches = list(itertools.islice(iter(sampler), sampler.batches_per_epoch))
    everything = collate(ds.__getitems__(list(range(len(ds)))))
    in_ram = TensorDataset(everything["x"], everything["y"])

    class PerItem(Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return ds[i]

    readers: dict[str, tuple[Any, Any]] = {
        "TensorDataset (in RAM)": (in_ram, None),
        "SegmentedDataset": (ds, collate),
        "SegmentedDataset, per-sample __getitem__": (PerItem(), collate),
    }
    times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, (dataset, collate_fn) in readers.items():
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn)
            start = time.perf_counter()
            for _batch in loader:
                pass
            times[name].append(time.perf_counter() - start)
    samples = len(batches) * BATCH
    return {
        "num_batches": len(batches),
        "samples_per_s": {name: samples / statistics.median(t) for name, t in times.items()},
    }


def child_order(num_samples: int, file_backed: bool, order_dir: str) -> dict[str, Any]:
    import numpy as np

    from rangerdl.data import epoch_order

    start = time.perf_counter()
    order = epoch_order(
        num_samples, 0, 0, max_ram_samples=0 if file_backed else num_samples, order_dir=order_dir
    )
    seconds = time.perf_counter() - start
    probe = int(np.asarray(order[num_samples // 2]))
    return {"seconds": seconds, "probe": probe, "dtype": str(order.dtype)}


# ---- parent ---------------------------------------------------------------------------------


def prepare_dataset(workdir: Path, size_mib: int) -> tuple[Path, float]:
    from rangerdl.data import prepare

    samples = (size_mib << 20) // SAMPLE_BYTES
    start = time.perf_counter()
    out = prepare(
        "synthetic",
        workdir / f"syn-{size_mib}",
        samples=samples,
        shape=SAMPLE_SHAPE,
        test_fraction=0,
    )
    return out / "train", time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--order-samples", type=int, default=10**8)
    parser.add_argument("--repeats", type=int, default=5, help="throughput repeats per reader")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir on disk")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_loader.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "epoch":
            result = child_epoch(rest[0], int(rest[1]))
        elif kind == "throughput":
            result = child_throughput(rest[0], int(rest[1]))
        else:
            result = child_order(int(rest[0]), rest[1] == "file", rest[2])
        print(json.dumps(result))
        return

    command = f"python benchmarks/data_loader.py {shlex.join(sys.argv[1:])}".strip()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rangerdl-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    memory: list[dict[str, Any]] = []
    try:
        target = 0.05 * min(args.sizes_mib)
        throughput: dict[str, Any] = {}
        for size in sorted(args.sizes_mib):
            path, prep_s = prepare_dataset(workdir, size)
            print(f"prepared {size} MiB in {prep_s:.1f} s", flush=True)
            for workers in (0, 2):
                epoch = run_child("epoch", str(path), str(workers))
                for name, r in epoch["processes"].items():
                    if workers and name == "main":
                        name = "main (2 workers)"  # receives batches, reads nothing
                    memory.append(
                        {
                            "dataset_mib": size,
                            "num_samples": epoch["num_samples"],
                            "num_workers": workers,
                            "process": name,
                            "epoch_s": epoch["seconds"],
                            "rss_anon_start_mib": r["start"],
                            "rss_anon_peak_mib": r["peak"],
                            "growth_mib": r["growth"],
                            "target_mib": target,
                            "flat": r["growth"] < target,
                        }
                    )
            if size == min(args.sizes_mib):
                throughput = run_child("throughput", str(path), str(args.repeats))
                throughput["dataset_mib"] = size
            shutil.rmtree(path.parent)
        orders = {
            mode: run_child("order", str(args.order_samples), mode, str(workdir), monitor=True)
            for mode in ("file", "ram")
        }
        if orders["file"]["probe"] != orders["ram"]["probe"]:
            raise RuntimeError("file-backed and in-RAM orders differ")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rates = throughput["samples_per_s"]
    base = rates["TensorDataset (in RAM)"]
    result = {
        "benchmark": "data_loader",
        "command": command,
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "numpy": __import__("numpy").__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "batch_size": BATCH,
        "sample_shape": list(SAMPLE_SHAPE),
        "memory": memory,
        "throughput": {
            **throughput,
            "ratio_to_tensor_dataset": {name: r / base for name, r in rates.items()},
        },
        "order": {"num_samples": args.order_samples, **orders},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"\nwrote {args.out}")


def print_tables(result: dict[str, Any]) -> None:
    print(f"\n`{result['command']}` ({result['cpus']} CPUs, torch {result['torch']})\n")
    print("| dataset | process | RssAnon after warm-up | peak | growth | epoch |")
    print("|---|---|---|---|---|---|")
    for r in result["memory"]:
        print(
            f"| {r['dataset_mib']} MiB | {r['process']} | {r['rss_anon_start_mib']:.1f} MiB | "
            f"{r['rss_anon_peak_mib']:.1f} MiB | {r['growth_mib']:+.1f} MiB | {r['epoch_s']:.1f} s |"
        )
    t = result["throughput"]
    print(
        f"\nthroughput, {t['dataset_mib']} MiB, {t['num_batches']} batches of {result['batch_size']}:\n"
    )
    print("| reader | samples/s | ratio |")
    print("|---|---|---|")
    for name, rate in t["samples_per_s"].items():
        print(f"| {name} | {rate:,.0f} | {t['ratio_to_tensor_dataset'][name]:.2f}x |")
    o = result["order"]
    print(f"\norder of {o['num_samples']:,} samples:\n")
    print("| build | seconds | peak RssAnon |")
    print("|---|---|---|")
    for mode, label in (("file", "file-backed (epoch_order)"), ("ram", "in RAM (rng.permutation)")):
        print(
            f"| {label}, {o[mode]['dtype']} | {o[mode]['seconds']:.1f} | {o[mode]['peak_rss_anon_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
