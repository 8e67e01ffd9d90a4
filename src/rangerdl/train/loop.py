"""``rangerdl train``: the training loop (``_train`` reads top to bottom), and evaluation.

Which weights are evaluated and saved: with Lookahead (Ranger, ``lookahead = true``, distributed
Ranger) the slow weights are the model worth keeping, so validation, test and ``model.pt`` use
them (swapped in for the pass, then swapped back so training continues undisturbed). Resuming
needs the fast weights too: they go into the per-rank training state.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rangerdl.optim.schedules import make_schedule
from rangerdl.train import checkpoint as ckpt
from rangerdl.train.config import Config
from rangerdl.train.metrics import MetricsLogger
from rangerdl.train.models import build_model
from rangerdl.train.optimizers import build_optimizer
from rangerdl.train.runtime import Runtime, init_runtime, rng_state, set_rng_state

log = logging.getLogger(__name__)

__all__ = ["Task", "TrainingError", "evaluate", "open_data", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, ...); the message says why and what is intact."""


def train(cfg: Config, *, resume: Path | None = None) -> dict[str, Any]:
    """Train per ``cfg`` (or continue the run in ``resume``); returns the summary (rank 0)."""
    rt = init_runtime(
        cfg.train.device, cfg.distributed.backend, cfg.train.threads, cfg.distributed.timeout_s
    )
    summary = _train(cfg, rt, resume)  # on an error the process exits and torchrun cleans up
    gc.collect()  # DDP's reducer (often in a reference cycle) must go before its process group
    rt.shutdown()
    return summary


def _train(cfg: Config, rt: Runtime, resume: Path | None) -> dict[str, Any]:
    from rangerdl.data import GlobalBatchSampler, collate

    run_dir = Path(rt.broadcast_object(str(choose_run_dir(cfg, resume)) if rt.is_main else None))
    start = ckpt.latest_valid(run_dir / "checkpoints") if run_dir.exists() else None
    if resume is not None and start is None:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint to resume from")
    splits = open_data(cfg, rt)
    train_ds, val_ds = splits["train"], splits.get("val", splits.get("test"))
    task = Task.from_metadata(train_ds.metadata)

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.name, cfg.model.args, task.model_kwargs).to(rt.device)
    optimizer, forward, comm_stats = build_optimizer(cfg, model, rt)
    schedule = make_schedule(
        optimizer,
        cfg.schedule.name,
        cfg.train.steps,
        warmup_steps=cfg.schedule.warmup_steps,
        anneal_start=cfg.schedule.anneal_start,
        min_lr_ratio=cfg.schedule.min_lr_ratio,
    )
    if cfg.data.batch_size % rt.world_size:
        raise ValueError(
            f"[data] batch_size = {cfg.data.batch_size} (the global batch) must be divisible by "
            f"the number of workers ({rt.world_size})"
        )
    sampler = GlobalBatchSampler(
        num_samples=len(train_ds),
        global_batch_size=cfg.data.batch_size,
        rank=rt.rank,
        world_size=rt.world_size,
        seed=cfg.run.seed,
        drop_last=cfg.data.drop_last,
        manifest_checksum=train_ds.checksum,
    )
    torch.manual_seed(cfg.run.seed + 1 + rt.rank)  # each rank its own dropout stream
    step, elapsed_before = 0, 0.0
    if start is not None:
        step, elapsed_before = restore(start, rt, model, optimizer, schedule, sampler)
        log.info("resuming %s from %s (step %d)", run_dir, start.name, step)
    elif rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    rt.barrier()
    metrics = MetricsLogger(
        run_dir,
        enabled=rt.is_main,
        tensorboard=cfg.log.tensorboard,
        progress=cfg.log.progress,
        total_steps=cfg.train.steps,
        start_step=step,
    )
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.run.seed),  # keep the global RNG untouched
    )
    train_time, window_t0, window_samples = 0.0, time.perf_counter(), 0

    def checkpoint() -> None:
        parts = (model, optimizer, schedule, sampler)
        save_checkpoint(run_dir, step, rt, *parts, cfg, elapsed_before + train_time)

    model.train()
    last_step = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
    for batch in loader:
        if step >= last_step:
            break
        t0 = time.perf_counter()
        loss = task.loss(
            forward(batch["x"].to(rt.device)), batch["y"].to(rt.device), batch.get("mask")
        )
        if torch.isfinite(loss):
            loss.backward()
            if cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        elif cfg.train.on_nan == "stop":
            raise TrainingError(
                f"step {step + 1}: the loss is {loss.item()}; stopping before it reaches a checkpoint. "
                f"The last checkpoint in {run_dir / 'checkpoints'} is intact; lower [optim] lr, set "
                '[train] grad_clip, or set [train] on_nan = "skip".'
            )
        else:  # skip: no update, but the step still counts everywhere (schedule, sync clock, data)
            if getattr(forward, "require_backward_grad_sync", False):
                loss.backward()  # DDP: every rank must join the gradient all-reduce
            log.warning("step %d: loss is %s; skipping the update", step + 1, loss.item())
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        sampler.advance(1)
        step += 1
        train_time += time.perf_counter() - t0
        window_samples += cfg.data.batch_size

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            now = time.perf_counter()
            speed = window_samples / max(now - window_t0, 1e-9)
            values = {"train/loss": loss.item(), "optim/lr": optimizer.param_groups[0]["lr"]}
            values |= {"perf/samples_per_s": speed, "time/train_s": elapsed_before + train_time}
            values |= comm_stats() if comm_stats else {}
            metrics.log(step, values)
            metrics.progress(step, values["train/loss"], speed)
            window_t0, window_samples = now, 0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            metrics.log(step, validate(model, optimizer, val_ds, task, rt, cfg, prefix="val"))
        # The last step's checkpoint is written once, below (after the final sync, if any).
        if (
            cfg.train.checkpoint_every
            and step % cfg.train.checkpoint_every == 0
            and step < last_step
        ):
            checkpoint()

    if step < cfg.train.steps:  # stop_at: leave as if interrupted, the checkpoint to resume from
        checkpoint()
        metrics.close()
        log.info(
            "stopped at step %d of %d (stop_at); continue with --resume %s",
            step,
            cfg.train.steps,
            run_dir,
        )
        return {"run_dir": str(run_dir), "step": step, "stopped": True}
    finish = getattr(optimizer, "finish", None)
    if finish is not None:  # distributed: a final sync so every rank holds the global model
        t0 = time.perf_counter()
        finish()
        train_time += time.perf_counter() - t0
    # Without a val split, periodic validation used the test split: report it once, as test/.
    last_val = {}
    if "val" in splits:
        last_val = validate(model, optimizer, splits["val"], task, rt, cfg, prefix="val")
    test = {}
    if "test" in splits:
        test = validate(model, optimizer, splits["test"], task, rt, cfg, prefix="test")
    metrics.log(step, last_val | test | {"time/train_s": elapsed_before + train_time})
    checkpoint()
    metrics.close()
    total_time = elapsed_before + train_time
    summary = {
        "run_dir": str(run_dir),
        "step": step,
        "train_time_s": total_time,
        "samples_per_s": step * cfg.data.batch_size / max(total_time, 1e-9),
        "world_size": rt.world_size,
        "checkpoint": str(run_dir / "checkpoints" / f"step-{step}"),
        **last_val,
        **test,
        **(comm_stats() if comm_stats else {}),
    }
    if rt.is_main:
        ckpt.atomic_write_text(
            run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n"
        )
    return summary


def choose_run_dir(cfg: Config, resume: Path | None) -> Path:
    """The run folder. A fresh run never writes into an existing run, except when torchrun
    restarts this very job (elastic restart), which resumes from its latest checkpoint."""
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise FileNotFoundError(f"{resume} is not a run folder (no config.json)")
        return resume
    model = cfg.model.name.replace(":", "-").replace(".", "-")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    name = cfg.run.name or (
        f"{model}-{run_id}" if run_id else datetime.now().strftime(f"{model}-%Y%m%d-%H%M%S")
    )
    run_dir = Path(cfg.run.dir) / name
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if run_dir.exists() and any(run_dir.iterdir()) and not restarted:
        raise ValueError(
            f"run folder {run_dir} already exists; continue it with `rangerdl train --resume {run_dir}` "
            "or choose another name with --run.name=NAME"
        )
    return run_dir


def open_data(cfg: Config, rt: Runtime) -> dict[str, Any]:
    """The splits of ``[data] path``, or of a built-in source prepared on first use (by local
    rank 0; the others wait) into the cache folder."""
    from rangerdl.data import open_splits, prepare

    if cfg.data.path:
        return open_splits(Path(cfg.data.path))
    sources: dict[str, tuple[str, dict[str, Any]]] = {
        "digits": ("digits", {}),
        "text": (f"text-L{cfg.data.seq_len}", {"seq_len": cfg.data.seq_len}),
    }
    if cfg.data.source not in sources:
        raise ValueError(
            f"[data] source = {cfg.data.source!r}: expected one of {', '.join(sources)} "
            "(or set [data] path to a prepared dataset)"
        )
    cache = Path(
        cfg.data.cache_dir
        or os.environ.get("RANGERDL_CACHE")
        or Path.home() / ".cache" / "rangerdl"
    )
    folder_name, options = sources[cfg.data.source]
    folder = cache / folder_name
    if rt.local_rank == 0 and not (folder / "train").is_dir():
        log.info("preparing the built-in %r dataset in %s (first use)", cfg.data.source, folder)
        tmp = cache / f".tmp-{folder_name}-{os.getpid()}"
        prepare(cfg.data.source, tmp, **options)
        try:
            os.replace(tmp, folder)
        except OSError:  # another job prepared it meanwhile
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    rt.barrier()
    return open_splits(folder)


@dataclass
class Task:
    """What the dataset asks for: classification (cross entropy, accuracy), regression (mean
    squared error, RMSE) or language modelling (cross entropy per token, next-token accuracy,
    bits per byte)."""

    kind: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Task:
        kind = meta.get("task")
        if kind == "classification":
            return cls(
                kind, {"input_shape": list(meta["input_shape"]), "num_classes": meta["num_classes"]}
            )
        if kind == "lm":
            return cls(kind, {"vocab_size": meta["vocab_size"], "seq_len": meta["seq_len"]})
        if kind == "regression":  # models get num_classes = the number of regression targets
            outputs = math.prod(meta.get("target_shape") or [])
            return cls(kind, {"input_shape": list(meta["input_shape"]), "num_classes": outputs})
        raise ValueError(
            f"dataset metadata 'task' = {kind!r}: expected 'classification', 'regression' or 'lm'"
        )

    def per_sample_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "regression":
            err = (logits.reshape(y.shape[0], -1) - y.reshape(y.shape[0], -1).to(logits.dtype)) ** 2
            return err.mean(dim=1)
        if self.kind == "lm":
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(
                y.shape
            )
        return F.cross_entropy(logits, y, reduction="none")

    def loss(
        self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        losses = self.per_sample_losses(logits, y)
        if mask is None:
            return losses.mean()
        mask = mask.to(losses.device).view(-1, *([1] * (losses.dim() - 1))).expand_as(losses)
        return (losses * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Any, task: Task, rt: Runtime, batch_size: int, max_batches: int = 0
) -> dict[str, float]:
    """Mean loss and accuracy over ``dataset`` (each rank a strided share, summed)."""
    from rangerdl.data import collate

    n = len(dataset) if not max_batches else min(len(dataset), max_batches * batch_size)
    shard = torch.utils.data.Subset(dataset, range(rt.rank, n, rt.world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=collate)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for batch in loader:
        x, y = batch["x"].to(rt.device), batch["y"].to(rt.device)
        logits = model(x)
        losses = task.per_sample_losses(logits, y)
        loss_sum += losses.double().sum().item()
        if task.kind != "regression":
            correct += (logits.argmax(-1) == y).double().sum().item()
        count += losses.numel()
    model.train(was_training)
    loss_sum, correct, count = rt.all_sum([loss_sum, correct, count])
    mean = loss_sum / max(count, 1)
    if task.kind == "regression":
        return {"loss": mean, "rmse": math.sqrt(mean)}
    out = {"loss": mean, "accuracy": correct / max(count, 1)}
    if task.kind == "lm":
        out["bits_per_byte"] = mean / math.log(2)
    return out


def validate(
    model: nn.Module,
    optimizer: Any,
    dataset: Any,
    task: Task,
    rt: Runtime,
    cfg: Config,
    *,
    prefix: str,
) -> dict[str, float]:
    with global_weights(model, optimizer):
        metrics = evaluate(
            model, dataset, task, rt, cfg.data.eval_batch_size, cfg.train.eval_batches
        )
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


@contextmanager
def global_weights(model: nn.Module, optimizer: Any) -> Iterator[None]:
    """Swap the Lookahead slow weights (if the optimizer has them) into ``model`` for a pass."""
    slow = list(optimizer.slow_weights()) if hasattr(optimizer, "slow_weights") else []
    backup = [p.detach().clone() for p, _ in slow]
    with torch.no_grad():
        for p, s in slow:
            p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), b in zip(slow, backup, strict=True):
                p.copy_(b)


def save_checkpoint(
    run_dir: Path,
    step: int,
    rt: Runtime,
    model: nn.Module,
    optimizer: Any,
    schedule: Any,
    sampler: Any,
    cfg: Config,
    elapsed_s: float,
) -> None:
    folder = run_dir / "checkpoints"
    if rt.is_main:
        ckpt.staging_dir(folder, step)
    rt.barrier()
    tmp = folder / f".tmp-step-{step}"
    state = {
        "step": step,
        "world_size": rt.world_size,
        "elapsed_s": elapsed_s,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": rng_state(),
    }
    digests = {f"state-rank{rt.rank}.pt": ckpt.write_file(tmp, f"state-rank{rt.rank}.pt", state)}
    with global_weights(model, optimizer):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rt.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * rt.world_size
        dist.all_gather_object(gathered, digests)
        digests = {k: v for d in gathered for k, v in d.items()}
    if rt.is_main:
        digests["model.pt"] = ckpt.write_file(tmp, "model.pt", weights)
        ckpt.commit(folder, step, digests, cfg.train.keep_checkpoints)
    rt.barrier()


def restore(
    folder: Path, rt: Runtime, model: nn.Module, optimizer: Any, schedule: Any, sampler: Any
) -> tuple[int, float]:
    path = folder / f"state-rank{rt.rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: was {folder} written by a job with another world size?"
        )
    state = ckpt.load(path)
    if state["world_size"] != rt.world_size:
        raise ValueError(
            f"{folder} was written by {state['world_size']} workers, this job has {rt.world_size}: "
            "each worker's optimizer state is its own, so resume with the same number of workers"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return int(state["step"]), float(state["elapsed_s"])
