"""Median optimizer step time of Ranger against torch's fused Adam/AdamW and other Ranger implementations.

All contenders run in one process on the same GPT-like parameter set (12 layers of width 384, ~145
tensors, ~24M values), with the same gradients, interleaved round-robin so that machine noise hits
all of them alike. Prints a table with ratios to fused AdamW and writes
``benchmarks/results/optimizer_step.json``.

    python benchmarks/optimizer_step.py [--threads 2] [--repeats 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from rangerdl import Ranger

RESULTS = Path(__file__).resolve().parent / "results"


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


def contenders() -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    import pytorch_optimizer
    import pytorch_ranger

    return {
        "torch AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "torch Adam fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
        "rangerdl Ranger GC off": lambda p: Ranger(p, use_gc=False),
        "rangerdl Ranger GC on": lambda p: Ranger(p, use_gc=True),
        "rangerdl Ranger GC off foreach": lambda p: Ranger(p, use_gc=False, foreach=True),
        "rangerdl Ranger GC on foreach": lambda p: Ranger(p, use_gc=True, foreach=True),
        "torch RAdam foreach": lambda p: torch.optim.RAdam(
            p, lr=1e-3, betas=(0.95, 0.999), eps=1e-5, decoupled_weight_decay=True, foreach=True
        ),
        "pytorch_ranger.Ranger (no GC)": lambda p: pytorch_ranger.Ranger(p, lr=1e-3),
        "pytorch_optimizer.Ranger (GC on)": lambda p: pytorch_optimizer.Ranger(
            p, lr=1e-3, degenerated_to_sgd=True
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per contender")
    parser.add_argument(
        "--warmup", type=int, default=8, help="untimed steps (past RAdam's SGD phase)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "optimizer_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)

    shapes = gpt_like_shapes()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(device) * 1e-2 for s in shapes]
    runs = {}
    for name, make in contenders().items():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        runs[name] = (make(params), [])
    num_values = sum(p.numel() for p in next(iter(runs.values()))[0].param_groups[0]["params"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for opt, _ in runs.values():
        for _ in range(args.warmup):
            opt.step()
    for _ in range(args.repeats):  # round-robin: drift and noise hit every contender alike
        for opt, times in runs.values():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - t0)

    base = statistics.median(runs["torch AdamW fused"][1])
    rows = []
    print(
        f"{len(shapes)} tensors, {num_values / 1e6:.1f}M values, {args.threads} threads, {device}"
    )
    print(f"{'optimizer':36s} {'median ms':>10s} {'vs fused AdamW':>15s}")
    for name, (_, times) in runs.items():
        med = statistics.median(times)
        rows.append({"optimizer": name, "median_ms": med * 1e3, "ratio_to_fused_adamw": med / base})
        print(f"{name:36s} {med * 1e3:10.1f} {med / base:14.2f}x")

    by = {r["optimizer"]: r["median_ms"] for r in rows}
    targets = {
        "gc_off_vs_fused_adamw": by["rangerdl Ranger GC off"] / by["torch AdamW fused"],
        "gc_off_speedup_vs_pytorch_ranger": by["pytorch_ranger.Ranger (no GC)"]
        / by["rangerdl Ranger GC off"],
        "gc_on_vs_fused_adamw": by["rangerdl Ranger GC on"] / by["torch AdamW fused"],
        "gc_on_speedup_vs_pytorch_optimizer": by["pytorch_optimizer.Ranger (GC on)"]
        / by["rangerdl Ranger GC on"],
    }
    print("targets: GC off <= 1.25x fused AdamW and >= 2x faster than pytorch_ranger;")
    print("         GC on  <= 1.6x fused AdamW and >= 3x faster than pytorch_optimizer.Ranger")
    for key, value in targets.items():
        print(f"  {key}: {value:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "optimizer_step",
                "command": "python benchmarks/optimizer_step.py "
                f"--threads {args.threads} --repeats {args.repeats} --device {args.device}",
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": args.threads,
                "device": str(device),
                "num_tensors": len(shapes),
                "num_values": num_values,
                "rows": rows,
                "ratios": targets,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
