"""Compressed pseudo-gradients: bytes, encode/decode cost and validation loss at equal steps.

The GPT workload of the time-to-quality protocol (``configs/ttq_gpt.toml``: a byte-level GPT,
2 workers, global batch 32, 1024 steps, Ranger lr 0.032 and DDP AdamW lr 0.002 as tuned there)
trained through ``rangerdl train`` under ``torchrun --standalone`` (loopback: the loss at equal
steps does not depend on the link). Per payload (``[distributed] compression`` at k = 8,
``block_size`` 256, ``topk_density`` 0.03, error feedback on) and for DDP AdamW:

- ``bytes_per_rank``: the run's ``comm/bytes`` (what was handed to the collectives), and its ratio
  to DDP's over the same steps;
- ``codec_share``: encoding + decoding seconds per sync (``comm/codec_s`` / syncs) over one
  training step (train time / steps) of the same run, and the same from a single-thread
  microbenchmark of the sync's encode/decode work on the GPT's parameter count;
- ``val_loss``: final validation loss (slow weights), per seed.

Also the two exchanges at W = 2 (all-to-all + all-gather vs one all-gather of the same bytes),
timed on gloo over loopback.

::

    python benchmarks/compression.py                 # ~9 min per seed on 2 cores
    python benchmarks/compression.py --seeds 0 --payloads none int4
    python benchmarks/compression.py --merge --seeds 0 --payloads topk:0.1   # another density
    python benchmarks/compression.py --quick         # smoke test, numbers meaningless

A payload ``topk:D`` is ``topk`` with ``topk_density = D``. ``--merge`` keeps the runs (and the
exchange timings) already in the results file and replaces those it runs again; the codec
microbenchmark (seconds) is always measured anew.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import atomic_write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = HERE / "configs" / "ttq_gpt.toml"
OUT = HERE / "results" / "compression.json"
STEPS, K, WORKERS = 1024, 8, 2
LR = {"ranger": 0.032, "adamw": 0.002}  # the protocol's tuned lrs (2 hosts)
PAYLOADS = ("none", "bf16", "int8", "int4", "int2", "topk")
QUICK = ("--model.args.n_layer=1", "--model.args.n_embd=32", "--train.steps=32")


def overrides(payload: str, seed: int, steps: int) -> list[str]:
    """``rangerdl train`` overrides of one run (``ddp``: DDP AdamW; else distributed Ranger)."""
    common = [
        f"--run.seed={seed}",
        f"--train.steps={steps}",
        f"--train.eval_every={steps}",
        "--train.final_eval_batches=4",  # [train] eval_batches of the workload
        "--train.threads=1",
    ]
    if payload == "ddp":
        return [
            *common,
            "--optim.name=adamw",
            f"--optim.lr={LR['adamw']}",
            "--optim.betas=[0.9, 0.999]",
            "--optim.eps=1e-8",
            "--distributed.strategy=ddp",
        ]
    compression, _, density = payload.partition(":")
    return [
        *common,
        "--optim.name=ranger",
        f"--optim.lr={LR['ranger']}",
        f"--optim.k={K}",
        "--distributed.strategy=lookahead",
        f"--distributed.compression={compression}",
        *([f"--distributed.topk_density={density}"] if density else []),
    ]


def train(workdir: Path, payload: str, seed: int, steps: int, quick: bool) -> dict[str, Any]:
    name = f"{payload.replace(':', '-')}-s{seed}"
    args = [str(CONFIG), *overrides(payload, seed, steps), f"--run.name={name}"]
    args += [f"--run.dir={workdir / 'runs'}", *(QUICK if quick else ())]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv += [f"--nproc-per-node={WORKERS}", "-m", "rangerdl", "train", *args]
    env = {**os.environ, "RANGERDL_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr[-3000:]}")
    summary = json.loads((workdir / "runs" / name / "summary.json").read_text())
    train_s, done = summary["train_time_s"], summary["step"]
    syncs = summary.get("comm/syncs") or 0
    codec = summary.get("comm/codec_s")
    row = {
        "payload": payload,
        "seed": seed,
        "steps": done,
        "val_loss": summary["val/loss"],
        "bytes_per_rank": summary["comm/bytes"],
        "syncs": syncs,
        "train_time_s": train_s,
        "step_s": train_s / done,
        "comm_time_s": summary.get("comm/time_s"),
        "codec_s": codec,
        "codec_share_in_run": None if codec is None else codec / syncs / (train_s / done),
        "wall_s": time.monotonic() - t0,
        "date": time.strftime("%Y-%m-%d"),
        "command": "torchrun --standalone --nproc-per-node=2 -m rangerdl train "
        + " ".join(a for a in args if not a.startswith("--run.dir")),
    }
    print(
        f"  {name:<12} val {row['val_loss']:.4f}  bytes {row['bytes_per_rank']:.4g}  "
        f"step {1000 * row['step_s']:.1f} ms  codec/step "
        f"{'-' if codec is None else format(row['codec_share_in_run'], '.4f')}",
        flush=True,
    )
    return row


def codec_micro(numel: int, repeats: int = 20) -> dict[str, float]:
    """Seconds of one sync's encode/decode work on one rank, W = 2, single thread, done as
    ``OuterSync`` does it with error feedback (its buffers kept from sync to sync): theta - phi
    plus the residual, encoded in W chunks whose decoded values the encoding gives back (the
    residual keeps what they lost); then ``exchange_mean`` on a stand-in all-gather, its copy
    not counted: decode the other rank's payload, sum with this rank's decoded values. Median
    of ``repeats``; the parameters come as one flat tensor (the sync copies them from the
    model)."""
    import torch

    from rangerdl.distributed.compression import Codec, exchange_mean

    torch.set_num_threads(1)
    chunk = -(-numel // WORKERS)
    waited = [0.0]

    def run(fn: Any, received: torch.Tensor, given: torch.Tensor) -> None:
        """The collective as rank 0 sees it when every rank sent what it did."""
        t0 = time.perf_counter()
        copies = received.numel() // given.numel()
        received.view(copies, *given.shape).copy_(given.expand(copies, *given.shape))
        waited[0] += time.perf_counter() - t0

    gen = torch.Generator().manual_seed(0)
    slow = torch.randn(numel, generator=gen)
    theta = slow + 1e-3 * torch.randn(numel, generator=gen)
    out = {}
    for name in PAYLOADS[1:]:
        codec = Codec(name)
        delta = torch.zeros(WORKERS, chunk)
        residual, mean_residual = torch.zeros(WORKERS, chunk), torch.zeros(chunk)
        payload = torch.empty(WORKERS, codec.nbytes(chunk), dtype=torch.uint8)
        mean, sent = torch.empty(WORKERS * chunk), torch.empty(WORKERS, chunk)
        times = []
        for _ in range(repeats + 2):
            waited[0] = 0.0
            t0 = time.perf_counter()
            delta.view(-1)[:numel].copy_(theta).sub_(slow)
            delta.add_(residual)
            codec.encode(delta, out=payload, dequantized=sent)
            torch.sub(delta, sent, out=residual)
            exchange_mean(
                codec, payload, chunk, WORKERS, run, device=torch.device("cpu"),
                mean_residual=mean_residual, mode="all_gather", rank=0, own=sent, out=mean,
            )  # fmt: skip
            times.append(time.perf_counter() - t0 - waited[0])
        out[name] = statistics.median(times[2:])
    return out


def _exchange_worker(rank: int, numel: int, port: int, repeats: int, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    from rangerdl.distributed.compression import Codec, blocking_on, exchange_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    run, chunk = blocking_on(dist.group.WORLD), -(-numel // WORKERS)
    result = {}
    for name in ("int4", "topk"):
        codec = Codec(name)
        payload = codec.encode(torch.randn(WORKERS, chunk))
        for mode in ("all_to_all", "all_gather"):
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                exchange_mean(
                    codec, payload, chunk, WORKERS, run, device=torch.device("cpu"), mode=mode,
                    rank=rank,
                )  # fmt: skip
                times.append(time.perf_counter() - t0)
            result[f"{name} {mode}"] = statistics.median(times)
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def exchange_modes(numel: int, repeats: int = 30) -> dict[str, float]:
    """Median seconds of ``exchange_mean`` (collectives + decode/encode) per mode, W = 2, gloo."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_exchange_worker, args=(r, numel, port, repeats, queue))
        for r in range(WORKERS)
    ]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return result


def gpt_numel(quick: bool) -> int:
    import torch

    from rangerdl.train.config import load_config
    from rangerdl.train.data import open_data
    from rangerdl.train.models import build_model
    from rangerdl.train.runtime import Runtime
    from rangerdl.train.task import Task

    cfg = load_config(CONFIG, list(QUICK) if quick else None)
    splits = open_data(cfg.data, Runtime(0, 1, 0, torch.device("cpu"), None))  # prepares data
    task = Task.from_metadata(splits["train"].metadata)
    model = build_model(cfg.model.name, cfg.model.args, task.model_kwargs)
    return sum(p.numel() for p in model.parameters())


def analyse(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Per payload: mean bytes ratio to DDP, codec share, loss mean/sd over seeds."""
    runs = payload["runs"]
    ddp = [r for r in runs if r["payload"] == "ddp"]
    ddp_bytes = statistics.mean(r["bytes_per_rank"] for r in ddp) if ddp else None
    rows = []
    extra = sorted({r["payload"] for r in runs} - {"ddp", *PAYLOADS})
    for name in ("ddp", *PAYLOADS, *extra):
        mine = [r for r in runs if r["payload"] == name]
        if not mine:
            continue
        losses = [r["val_loss"] for r in mine]
        b = statistics.mean(r["bytes_per_rank"] for r in mine)
        shares = [r["codec_share_in_run"] for r in mine if r["codec_share_in_run"] is not None]
        micro = payload.get("codec_micro_s", {}).get(name)
        step = statistics.median(r["step_s"] for r in runs)
        rows.append(
            {
                "payload": name,
                "seeds": [r["seed"] for r in mine],
                "val_loss": losses,
                "val_loss_mean": statistics.mean(losses),
                "val_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
                "bytes_per_rank": b,
                "ddp_bytes_over_these": ddp_bytes / b if ddp_bytes and b else None,
                "codec_share_in_run": statistics.mean(shares) if shares else None,
                "codec_share_micro": None if micro is None else micro / step,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| payload | bytes/rank | DDP bytes / these | encode+decode per sync / step | "
        "val loss at 1024 steps |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        sd = f" +- {r['val_loss_sd']:.3f}" if r["val_loss_sd"] is not None else ""
        ratio = f"{r['ddp_bytes_over_these']:.0f}x" if r["ddp_bytes_over_these"] else "-"
        share = r["codec_share_in_run"]
        lines.append(
            f"| {r['payload']} | {r['bytes_per_rank'] / 1e6:.2f} MB | {ratio} | "
            f"{'-' if share is None else f'{100 * share:.2f}%'} | "
            f"{r['val_loss_mean']:.3f}{sd} (n={len(r['seeds'])}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--payloads", nargs="+", default=["ddp", *PAYLOADS])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--merge", action="store_true", help="keep the runs already in --out")
    args = parser.parse_args(argv)
    old = json.loads(args.out.read_text()) if args.merge and args.out.exists() else None
    with tempfile.TemporaryDirectory(prefix="rdl-compression-") as tmp:
        workdir = Path(tmp)
        os.environ["RANGERDL_CACHE"] = str(workdir / "cache")
        numel = gpt_numel(args.quick)
        payload: dict[str, Any] = {
            "what": __doc__.split("\n")[0],
            "workload": "configs/ttq_gpt.toml",
            "params": numel,
            "workers": WORKERS,
            "k": K,
            "block_size": 256,
            "topk_density": 0.03,
            "error_feedback": True,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "quick": args.quick,
            "codec_micro_s": codec_micro(numel),  # seconds, cheap: always of the code run now
            "codec_micro_date": time.strftime("%Y-%m-%d"),
            "exchange_s_w2": old["exchange_s_w2"] if old else exchange_modes(numel),
            "runs": [],
        }
        redo = {(p, s) for p in args.payloads for s in args.seeds}
        if old:
            payload["runs"] = [r for r in old["runs"] if (r["payload"], r["seed"]) not in redo]
        print(f"GPT: {numel:,} parameters; codec per sync (s): {payload['codec_micro_s']}")
        print(f"exchange at W=2 (s): {payload['exchange_s_w2']}", flush=True)
        steps = 32 if args.quick else STEPS
        for seed in args.seeds:
            for name in args.payloads:
                payload["runs"].append(train(workdir, name, seed, steps, args.quick))
                payload["summary"] = analyse(payload)
                atomic_write_json(args.out, payload)
    print(table(payload["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
