"""Optimizer step time of Ranger against torch's fused AdamW and other Ranger implementations.

For each size (GPT-like parameter sets of ~1M and ~25M values) and thread count, all contenders
run in one process on the same shapes and gradients, interleaved round-robin so that machine
noise hits all of them alike. One repeat of a contender is ``k = 6`` consecutive steps (so it
holds exactly one Lookahead step), timed as a whole; its ratio is taken to fused AdamW's repeat
next to it. Reports the median and min-max over repeats, and the bytes-moved floor: AdamW reads
g, m, v, p and writes m, v, p (28 bytes per fp32 value); Ranger adds the slow buffer's read and
write on every k-th step (28 + 8/k bytes) when the Lookahead step is folded into that step.
Writes ``benchmarks/results/optimizer_step.json``.

    python benchmarks/optimizer_step.py [--sizes 1M 25M] [--threads 1 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from rangerdl import Ranger

RESULTS = Path(__file__).resolve().parent / "results"
K = 6  # Ranger's Lookahead period (its default); one repeat = K steps
BASELINE = "torch AdamW fused"
SIZES = {"1M": (4, 128, 1536), "25M": (12, 384, 10240)}  # (num_layers, width, vocab)
NOT_MEASURED = {
    "torch.compile of the functional step (CPU, Inductor)": (
        "not a single pass with torch 2.13: Inductor fuses the row-mean reduction with the "
        "update only without in-place writes; with p, exp_avg and exp_avg_sq updated in place "
        "its outer-loop fusion fails to compile (KeyError in try_outer_loop_fusion_with_local_buf) "
        "or, with realize_reads_threshold=1, writes the new moments to temporaries and reads them "
        "back in a second loop (more than 28 bytes per value)"
    ),
}


def gpt_like_shapes(
    num_layers: int = 12, width: int = 384, vocab: int = 6144
) -> list[tuple[int, ...]]:
    """Parameter shapes of a small GPT: per layer 2 LayerNorms, qkv, proj and a 4x MLP."""
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(num_layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [
            (width,),
            (width,),
            (4 * width, width),
            (4 * width,),
            (width, 4 * width),
            (width,),
        ]
    return shapes


@contextlib.contextmanager
def cpu_kernel_off() -> Iterator[None]:
    """Ranger without its one-pass CPU kernel: torch's fused AdamW kernel for the rectified steps,
    gradient centralisation as a separate blocked pass, Lookahead as a separate pass."""
    old = os.environ.get("RANGERDL_CPU_KERNEL")
    os.environ["RANGERDL_CPU_KERNEL"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["RANGERDL_CPU_KERNEL"]
        else:
            os.environ["RANGERDL_CPU_KERNEL"] = old


# name -> (make optimizer, context the steps run in, bytes per value of the method's floor)
Contender = tuple[
    Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    Callable[[], contextlib.AbstractContextManager[None]],
    float,
]


def contenders() -> dict[str, Contender]:
    import pytorch_optimizer
    import pytorch_ranger

    none = contextlib.nullcontext
    ranger_floor = 28 + 8 / K
    return {
        BASELINE: (lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), none, 28.0),
        "rangerdl Ranger GC on": (lambda p: Ranger(p), none, ranger_floor),
        "rangerdl Ranger GC off": (lambda p: Ranger(p, use_gc=False), none, ranger_floor),
        "rangerdl Ranger GC on, torch fused AdamW + GC pass": (
            lambda p: Ranger(p, fused=True),
            cpu_kernel_off,
            ranger_floor,
        ),
        "rangerdl Ranger GC off, torch fused AdamW": (
            lambda p: Ranger(p, use_gc=False, fused=True),
            cpu_kernel_off,
            ranger_floor,
        ),
        "rangerdl Ranger GC on foreach": (lambda p: Ranger(p, foreach=True), none, ranger_floor),
        "pytorch_optimizer.Ranger (GC on)": (
            lambda p: pytorch_optimizer.Ranger(p, lr=1e-3, degenerated_to_sgd=True),
            none,
            ranger_floor,
        ),
        "pytorch_ranger.Ranger (no GC)": (
            lambda p: pytorch_ranger.Ranger(p, lr=1e-3),
            none,
            ranger_floor,
        ),
    }


def measure(
    shapes: list[tuple[int, ...]], threads: int, repeats: int, warmup_steps: int
) -> list[dict[str, object]]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    runs: dict[str, tuple[torch.optim.Optimizer, Any, float, list[float]]] = {}
    for name, (make, context, floor) in contenders().items():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt = make(params)
        with context():
            for _ in range(warmup_steps):  # past RAdam's SGD steps; builds the CPU kernel once
                opt.step()
        runs[name] = (opt, context, floor, [])
    for _ in range(repeats):  # round-robin: drift and noise hit every contender alike
        for opt, context, _, times in runs.values():
            with context():
                t0 = time.perf_counter()
                for _ in range(K):
                    opt.step()
                times.append((time.perf_counter() - t0) / K)
    num_values = sum(p.numel() for p in runs[BASELINE][0].param_groups[0]["params"])
    base = runs[BASELINE][3]
    rows = []
    for name, (_, _, floor, times) in runs.items():
        ratios = [t / b for t, b in zip(times, base, strict=True)]
        med = statistics.median(times)
        rows.append(
            {
                "optimizer": name,
                "median_ms": med * 1e3,
                "min_ms": min(times) * 1e3,
                "max_ms": max(times) * 1e3,
                "ratio_to_fused_adamw": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "floor_bytes_per_value": floor,
                "floor_ratio_to_adamw": floor / 28.0,
                "effective_GB_per_s": floor * num_values / med / 1e9,
            }
        )
    del runs
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15, help=f"repeats of {K} steps (>= 7)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps per contender")
    parser.add_argument("--out", type=Path, default=RESULTS / "optimizer_step.json")
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")
    warnings.filterwarnings("ignore")

    results = []
    for size in args.sizes:
        shapes = gpt_like_shapes(*SIZES[size])
        num_values = sum(torch.Size(s).numel() for s in shapes)
        for threads in args.threads:
            rows = measure(shapes, threads, args.repeats, args.warmup)
            results.append(
                {
                    "size": size,
                    "num_values": num_values,
                    "num_tensors": len(shapes),
                    "threads": threads,
                    "rows": rows,
                }
            )
            print(f"\n{size}: {num_values / 1e6:.2f}M values in {len(shapes)} tensors, "
                  f"{threads} thread(s), median of {args.repeats} repeats of {K} steps")  # fmt: skip
            print(
                f"{'optimizer':52s} {'ms/step':>8s} {'x AdamW':>8s} {'min-max':>12s} {'floor':>6s}"
            )
            for r in rows:
                spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
                print(
                    f"{r['optimizer']:52s} {r['median_ms']:8.2f} {r['ratio_to_fused_adamw']:7.2f}x "
                    f"{spread:>12s} {r['floor_ratio_to_adamw']:5.3f}x"
                )
    for name, why in NOT_MEASURED.items():
        print(f"not measured: {name}: {why}")
    command = (
        f"python benchmarks/optimizer_step.py --sizes {' '.join(args.sizes)} --threads "
        f"{' '.join(map(str, args.threads))} --repeats {args.repeats}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {
                "benchmark": "optimizer_step",
                "command": command,
                "torch": torch.__version__,
                "machine": platform.machine(),
                "processor": platform.processor(),
                "cpu_count": os.cpu_count(),
                "device": "cpu",
                "steps_per_repeat": K,
                "repeats": args.repeats,
                "results": results,
                "not_measured": NOT_MEASURED,
            },
            indent=2,
        )
        + "\n"
    )
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
