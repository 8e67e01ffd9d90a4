"""Single-process convergence: Ranger against AdamW, RAdam, SGD with momentum and Lookahead(AdamW).

Two tasks, each with one step budget for every optimizer: the digits CNN (scikit-learn's 8x8
digits; the trainer's periodic evaluation runs on the test split) and a byte-level GPT on the
Python standard library sources (validation split). Every optimizer runs at its usual default
learning rate and at 1/3x, 3x and 10x of it (the default plus a 3-value sweep; mostly upwards,
because at these short budgets the best rate of every Adam-family optimizer lies above its
default), with 3 seeds each (the seed sets the initial weights and the data order). Reported: the final validation loss (and
accuracy), mean and spread (sample standard deviation, min and max) over the seeds.

Each optimizer gets the hyperparameters its users get by default, not Ranger's:

- ``ranger``: lr 1e-3, betas (0.95, 0.999), eps 1e-5, k 6, alpha 0.5, gradient centralisation.
- ``adamw``, ``radam``: torch's defaults, lr 1e-3, betas (0.9, 0.999), eps 1e-8.
- ``lookahead_adamw``: AdamW as above inside Lookahead(k 6, alpha 0.5).
- ``sgd``: lr 0.1, momentum 0.9.

Shared by all: the same model, global batch, steps, seeds and schedule (the trainer's
``flat_anneal``: flat for 72% of the steps, then cosine to 0), weight decay 0, gradient clipping
at norm 1 on the language model. A run whose loss becomes NaN/Inf is reported as diverged.

Runs go through ``rangerdl.train.loop.train`` (the code ``rangerdl train`` runs) in a pool of
``--jobs`` worker processes with ``--threads`` torch threads each (default 2 x 1 on 2 cores).
Only losses are compared here, so timing noise from other work on the machine does not matter. Prints a table per task and writes ``benchmarks/results/convergence.json`` and
``convergence.png``::

    python benchmarks/convergence.py [--seeds 0 1 2] [--jobs 2] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "ranger": {"lr": 1e-3, "overrides": {"name": "ranger", "betas": [0.95, 0.999], "eps": 1e-5}},
    "adamw": {"lr": 1e-3, "overrides": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8}},
    "radam": {"lr": 1e-3, "overrides": {"name": "radam", "betas": [0.9, 0.999], "eps": 1e-8}},
    "sgd": {"lr": 0.1, "overrides": {"name": "sgd", "momentum": 0.9}},
    "lookahead_adamw": {
        "lr": 1e-3,
        "overrides": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "lookahead": True},
    },
}
LR_FACTORS = (1 / 3, 1.0, 3.0, 10.0)  # the default and 3 others around it, mostly above:
# at these short budgets the best lr of every Adam-family optimizer is above its default

TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "what": "digits CNN (channels 16, BatchNorm), batch 64; metric on the test split",
        "tables": {
            "data": {"source": "digits", "batch_size": 64, "eval_batch_size": 512},
            "model": {"name": "cnn", "args": {"channels": 16}},
            "train": {"steps": 150, "eval_every": 25},
        },
    },
    "charlm": {
        "what": "byte-level GPT (2 layers, width 64, 4 heads, context 64) on the Python stdlib "
        "sources, batch 32; metric on 1024 validation windows",
        "tables": {
            "data": {"source": "text", "seq_len": 64, "batch_size": 32, "eval_batch_size": 256},
            "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 4, "n_embd": 64}},
            # the final evaluation on the same 1024 windows as the periodic ones: one metric along
            # the curve (the whole splits would cost ~30 s a run, most of this benchmark's time)
            "train": {
                "steps": 200,
                "eval_every": 40,
                "eval_batches": 4,
                "final_eval_batches": 4,
                "grad_clip": 1.0,
            },
        },
    },
}
QUICK_STEPS = 12


def run_config(
    task: str, optimizer: str, lr: float, seed: int, *, run_dir: Path, quick: bool, threads: int
) -> dict[str, dict[str, Any]]:
    """The trainer's config tables for one run."""
    tables: dict[str, dict[str, Any]] = json.loads(json.dumps(TASKS[task]["tables"]))
    tables["optim"] = {**OPTIMIZERS[optimizer]["overrides"], "lr": lr, "weight_decay": 0.0}
    tables["run"] = {"dir": str(run_dir.parent), "name": run_dir.name, "seed": seed}
    tables["schedule"] = {"name": "flat_anneal"}
    tables["train"] |= {"checkpoint_every": 0, "device": "cpu", "threads": threads}
    tables["log"] = {"tensorboard": False, "progress": False}
    if quick:
        tables["train"] |= {"steps": QUICK_STEPS, "eval_every": QUICK_STEPS // 2}
        tables["train"] |= {"eval_batches": 1, "final_eval_batches": 1}
        if task == "charlm":
            tables["model"]["args"] = {"n_layer": 1, "n_head": 2, "n_embd": 16}
    return tables


def cli_command(tables: dict[str, dict[str, Any]]) -> str:
    """The ``rangerdl train`` command line that reproduces one run."""
    parts = ["rangerdl", "train"]
    for table, values in tables.items():
        for key, value in values.items():
            if isinstance(value, dict):
                parts += [f"--{table}.{key}.{k}={_toml(v)}" for k, v in value.items()]
            else:
                parts.append(f"--{table}.{key}={_toml(value)}")
    return shlex.join(parts)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(_toml(v) for v in value) + "]"
    return repr(value)


def train_once(tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One training run; returns the final metrics, the validation curve and the wall time."""
    from rangerdl.train.config import Config
    from rangerdl.train.loop import TrainingError, train
    from rangerdl.train.metrics import read_metrics

    cfg = Config.from_dict(tables, origin="convergence")
    cfg.validate()
    run_dir = Path(cfg.run.dir) / cfg.run.name
    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except TrainingError as exc:
        return {"diverged": True, "error": str(exc), "wall_s": time.perf_counter() - t0}
    wall_s = time.perf_counter() - t0
    curve = [(r["step"], r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]
    # Digits has no val split: its final report is test/ (the split the periodic val/ used).
    prefix = "val" if "val/loss" in summary else "test"
    if curve and curve[-1][0] != summary["step"]:
        curve.append((summary["step"], summary[f"{prefix}/loss"]))
    return {
        "diverged": False,
        "final_loss": summary[f"{prefix}/loss"],
        "final_accuracy": summary[f"{prefix}/accuracy"],
        "split": prefix,
        "train_time_s": summary["train_time_s"],
        "wall_s": wall_s,
        "curve": curve,
    }


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for one value), min and max."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, optimizer, lr): spread of the final loss and accuracy over seeds."""
    rows: dict[tuple[str, str, float], dict[str, Any]] = {}
    for run in runs:
        key = (run["task"], run["optimizer"], run["lr"])
        row = rows.setdefault(
            key,
            {
                "task": run["task"],
                "optimizer": run["optimizer"],
                "lr": run["lr"],
                "is_default_lr": run["is_default_lr"],
                "seeds": [],
                "diverged_seeds": [],
                "_loss": [],
                "_acc": [],
                "_curves": [],
            },
        )
        row["seeds"].append(run["seed"])
        if run["diverged"]:
            row["diverged_seeds"].append(run["seed"])
            continue
        row["_loss"].append(run["final_loss"])
        row["_acc"].append(run["final_accuracy"])
        row["_curves"].append(run["curve"])
    out = []
    for row in rows.values():
        row["final_loss"] = spread(row.pop("_loss"))
        row["final_accuracy"] = spread(row.pop("_acc"))
        curves = row.pop("_curves")
        if curves and all(len(c) == len(curves[0]) for c in curves):
            row["mean_curve"] = [
                [pts[0][0], statistics.fmean(p[1] for p in pts)]
                for pts in zip(*curves, strict=True)
            ]
        out.append(row)
    for task in {r["task"] for r in out}:  # best lr per optimizer: lowest mean loss, no divergence
        for opt in OPTIMIZERS:
            mine = [r for r in out if r["task"] == task and r["optimizer"] == opt]
            ok = [
                r for r in mine if not r["diverged_seeds"] and r["final_loss"]["mean"] is not None
            ]
            best = min(ok, key=lambda r: r["final_loss"]["mean"]) if ok else None
            for r in mine:
                r["is_best_lr"] = r is best
    return out


def _lr(row: dict[str, Any]) -> float:
    return float(row["lr"])


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """Top: final loss vs lr (mean, min-max bars); bottom: mean curve at each optimizer's best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7.5), squeeze=False)
    for j, task in enumerate(tasks):
        for opt in OPTIMIZERS:
            mine = sorted((r for r in rows if r["task"] == task and r["optimizer"] == opt), key=_lr)
            ok = [r for r in mine if r["final_loss"]["mean"] is not None]
            if ok:
                means = [r["final_loss"]["mean"] for r in ok]
                lo = [m - r["final_loss"]["min"] for m, r in zip(means, ok, strict=True)]
                hi = [r["final_loss"]["max"] - m for m, r in zip(means, ok, strict=True)]
                rel = [r["lr"] / OPTIMIZERS[opt]["lr"] for r in ok]
                axes[0][j].errorbar(rel, means, yerr=[lo, hi], marker="o", capsize=3, label=opt)
            best = next((r for r in mine if r.get("is_best_lr") and "mean_curve" in r), None)
            if best is not None:
                steps, losses = zip(*best["mean_curve"], strict=True)
                axes[1][j].plot(steps, losses, marker="o", ms=3, label=f"{opt} @ {best['lr']:.3g}")
        factors = sorted({r["lr"] / OPTIMIZERS[r["optimizer"]]["lr"] for r in rows})
        axes[0][j].set_xscale("log")
        axes[0][j].set_xticks(factors, [f"{f:.3g}x" for f in factors])
        axes[0][j].minorticks_off()
        axes[0][j].set_xlabel("lr / optimizer's default lr")
        axes[0][j].set_ylabel("final loss (mean, min..max over seeds)")
        axes[0][j].set_title(task)
        axes[1][j].set_xlabel("step")
        axes[1][j].set_ylabel("loss, mean over seeds, best lr")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1: several threads per run crawl when the cores are shared)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (processes)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_STEPS} steps, tiny GPT, default lr only (numbers meaningless)",
    )
    parser.add_argument("--workdir", type=Path, help="run folders and data (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS / "convergence.json")
    parser.add_argument("--png", type=Path, help="default: --out with .png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    png = args.png or args.out.with_suffix(".png")
    command = shlex.join(["python", "benchmarks/convergence.py", *sys.argv[1:]])
    factors = (1.0,) if args.quick else LR_FACTORS

    with tempfile.TemporaryDirectory(prefix="rdl-convergence-") as tmp:
        workdir = args.workdir or Path(tmp)
        os.environ["RANGERDL_CACHE"] = str(workdir / "cache")  # the workers inherit it
        jobs = []
        for task in args.tasks:
            for opt in args.optimizers:
                for factor in factors:
                    lr = OPTIMIZERS[opt]["lr"] * factor
                    for seed in args.seeds:
                        name = f"{task}-{opt}-lr{lr:.3g}-s{seed}"
                        tables = run_config(
                            task,
                            opt,
                            lr,
                            seed,
                            run_dir=workdir / "runs" / name,
                            quick=args.quick,
                            threads=args.threads,
                        )
                        meta = {"task": task, "optimizer": opt, "lr": lr, "seed": seed}
                        meta |= {"is_default_lr": factor == 1.0, "command": cli_command(tables)}
                        jobs.append((name, meta, tables))
        t_start = time.perf_counter()
        runs: list[dict[str, Any]] = []
        # spawn: fresh interpreters (torch is never imported in this process)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = [pool.submit(train_once, tables) for _, _, tables in jobs]
            for (name, meta, _), future in zip(jobs, futures, strict=True):
                result = future.result()
                runs.append(meta | result)
                loss = "diverged" if result["diverged"] else f"{result['final_loss']:.4f}"
                print(f"{name:<40} loss {loss:>8}  {result['wall_s']:6.1f} s", flush=True)
        total_s = time.perf_counter() - t_start

    rows = summarise(runs)
    payload = {
        "what": "single-process convergence: final loss after the same step budget, "
        "mean and spread over seeds, at each optimizer's default lr and 1/3x, 3x, 10x of it",
        "command": command,
        "quick": args.quick,
        "seeds": args.seeds,
        "lr_factors": list(factors),
        "optimizers": {k: {"default_lr": v["lr"], **v["overrides"]} for k, v in OPTIMIZERS.items()},
        "shared": "same model, global batch, steps, seeds; schedule flat_anneal; weight decay 0; "
        "grad clip 1.0 on charlm",
        "threads_per_run": args.threads,
        "parallel_runs": args.jobs,
        "tasks": {
            t: {
                "what": TASKS[t]["what"],
                "steps": QUICK_STEPS if args.quick else TASKS[t]["tables"]["train"]["steps"],
            }
            for t in args.tasks
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "total_s": total_s,
        "rows": rows,
        "runs": runs,
    }
    atomic_write_json(args.out, payload)
    plot(rows, png)
    from report import convergence_tables

    print()
    print(convergence_tables(payload))
    print(f"\nwrote {args.out} and {png} ({total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
