"""``rangerdl train``: the training loop, top to bottom.

Which weights are evaluated and saved: with Lookahead (Ranger, ``lookahead = true``, distributed
Ranger) the slow weights are the model worth keeping, so validation, test and ``model.pt`` use
them (swapped in for the pass, then swapped back so training continues undisturbed). Resuming
needs the fast weights too: they go into the per-rank training state.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from rangerdl._fileio import atomic_write_text
from rangerdl.optim.schedules import Multiplier, retarget_schedule
from rangerdl.train import checkpoint as ckpt
from rangerdl.train.config import Config
from rangerdl.train.data import open_data, training_splits
from rangerdl.train.evaluate import validate
from rangerdl.train.interrupt import StopRequest
from rangerdl.train.metrics import MetricsLogger
from rangerdl.train.models import build_model
from rangerdl.train.nonfinite import NonFiniteGuard, TrainingError
from rangerdl.train.optimizers import build_optimizer
from rangerdl.train.run_folder import open_run, record_config
from rangerdl.train.runtime import Runtime, init_runtime
from rangerdl.train.task import Task

log = logging.getLogger(__name__)

__all__ = ["TrainingError", "train"]


def train(cfg: Config, *, resume: Path | None = None) -> dict[str, Any]:
    """Train per ``cfg`` (or continue the run in ``resume``); returns the summary (the final
    metrics, step, times, run folder; on rank 0 also written to ``summary.json``).

    Raises:
        TrainingError: a non-finite loss with ``on_nan = "stop"``.
        ValueError, FileNotFoundError: bad config, data or run folder (named in the message).
    """
    d = cfg.distributed
    group = (d.group_index(), d.replica_groups) if d.backend == "torchft" else None
    rt = init_runtime(cfg.train.device, d.backend, cfg.train.threads, d.timeout_s, group)
    with contextlib.ExitStack() as held:  # the run folder's lock (rank 0), released at the end
        summary = _train(cfg, rt, resume, held)  # on an error torchrun ends the other ranks
    gc.collect()  # DDP's reducer (often in a reference cycle) must go before its process group
    rt.shutdown()
    return summary


def _train(
    cfg: Config, rt: Runtime, resume: Path | None, held: contextlib.ExitStack
) -> dict[str, Any]:
    from rangerdl.data import GlobalBatchSampler, collate

    run, start = open_run(cfg, rt, resume, held)
    splits = open_data(cfg.data, rt)
    train_ds, val_ds, val_what = training_splits(splits, cfg.data.val_fraction, cfg.run.seed)
    task = Task.from_metadata(splits["train"].metadata)
    shard, shards = rt.shard  # this process's share of each global batch
    if cfg.data.batch_size % shards:
        raise ValueError(
            f"[data] batch_size = {cfg.data.batch_size} (the global batch) must be divisible by "
            f"the number of workers ({shards})"
        )

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model.name, cfg.model.args, task.model_kwargs).to(rt.device)
    opt = build_optimizer(cfg, model, rt)
    held.callback(opt.close)  # normal end, error or signal: no sync thread or group outlives it
    s = cfg.schedule
    planned = Multiplier(
        s.name,
        cfg.train.steps,
        warmup_steps=s.warmup_steps,
        anneal_start=s.anneal_start,
        min_lr_ratio=s.min_lr_ratio,
    )
    schedule = LambdaLR(opt.optimizer, copy.copy(planned))
    sampler = GlobalBatchSampler(
        num_samples=len(train_ds),
        global_batch_size=cfg.data.batch_size,
        rank=shard,
        world_size=shards,
        seed=cfg.run.seed if cfg.run.data_seed < 0 else cfg.run.data_seed,
        drop_last=cfg.data.drop_last,
        manifest_checksum=splits["train"].checksum,
    )
    t = cfg.train
    checkpointer = ckpt.Checkpointer(
        run, rt, model, opt, schedule, sampler, t.checkpoint_every, t.keep_checkpoints
    )
    torch.manual_seed(cfg.run.seed + 1 + shard)  # each rank its own dropout stream
    step, elapsed_before = 0, 0.0
    if start is not None:
        step, elapsed_before = checkpointer.restore(start)
        log.info("resuming %s from %s (step %d)", run, start.name, step)
        if step >= t.steps:
            raise ValueError(
                f"{run} is already at step {step} and [train] steps = {t.steps}: nothing to "
                f"train. Extend it with --train.steps=N (N > {step}); `rangerdl eval {run}` "
                "evaluates it"
            )
        for change in retarget_schedule(schedule, planned, cfg.optim.lr, step):
            log.info("resume: %s", change)
    if rt.is_main:
        record_config(run, cfg, step)
    rt.barrier()
    guard = NonFiniteGuard(model, rt, t.on_nan, t.max_nan_skips)
    metrics = MetricsLogger(
        run.path,
        enabled=rt.is_main,
        tensorboard=cfg.log.tensorboard,
        progress=cfg.log.progress,
        total_steps=t.steps,
        start_step=step,
        config=cfg.to_dict(),
    )
    metrics.describe_model(model, shards)  # every worker, of every replica group
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.run.seed),  # keep the global RNG untouched
    )

    def evaluation(split: str, dataset: Any, max_batches: int = 0) -> dict[str, float]:
        size, final = cfg.data.eval_batch_size, step == t.steps
        return validate(
            opt,
            dataset,
            task,
            rt,
            batch_size=size,
            max_batches=max_batches,
            prefix=split,
            progress=final,
        )

    sample = f"; the first {t.eval_batches} batches" if t.eval_batches else ""
    final_what = "the whole splits (cap them with --train.final_eval_batches=N)"
    if t.final_eval_batches:
        final_what = f"the first {t.final_eval_batches} batches of each split"
    if rt.is_main:
        what = "periodic validation (val/): %s%s; the final val/ and test/: %s"
        log.info(what, val_what, sample, final_what)
    stop = held.enter_context(StopRequest(rt))
    train_time, window_t0, window_samples = 0.0, time.perf_counter(), 0
    healed: dict[str, Any] = {}  # torchft: the step a peer's state moved this group to

    def progress() -> dict[str, Any]:
        """What a replica group that heals from this one takes besides the weights (torchft)."""
        return {
            "step": step,
            "sampler": sampler.state_dict(),
            "schedule": schedule.state_dict(),
        }

    def load_progress(state: dict[str, Any]) -> None:
        sampler.load_state_dict(state["sampler"])
        schedule.load_state_dict(state["schedule"])
        healed["step"] = int(state["step"])

    if opt.manager is not None:
        opt.sync.user_state = (progress, load_progress)
    model.train()
    last_step = min(t.steps, t.stop_at or t.steps)
    batches = iter(loader)
    while step < last_step:
        batch = next(batches)
        t0 = time.perf_counter()
        guard.before_forward()
        x = batch["x"].to(rt.device)
        loss = task.loss(opt.model(x), batch["y"].to(rt.device), batch.get("mask"))
        # skip: no update on any rank, but the step still counts (schedule, sync clock, data)
        if not guard.should_skip(step + 1, loss, x, str(run.checkpoints)):
            loss.backward()
            if t.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.optimizer.step()
        if healed:  # took a live peer's state: its step, data position and schedule
            step = healed.pop("step")
            batches = iter(loader)  # from the new data position
        schedule.step()
        opt.optimizer.zero_grad(set_to_none=True)
        sampler.advance(1)
        step += 1
        train_time += time.perf_counter() - t0
        window_samples += cfg.data.batch_size

        if step % t.log_every == 0 or step == t.steps:
            now = time.perf_counter()
            speed = window_samples / max(now - window_t0, 1e-9)
            values = {"train/loss": loss.item(), "optim/lr": opt.optimizer.param_groups[0]["lr"]}
            values |= {"perf/samples_per_s": speed, "time/train_s": elapsed_before + train_time}
            metrics.log(step, values | opt.comm_stats())
            metrics.progress(step, values["train/loss"], speed)
            window_t0, window_samples = now, 0
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            metrics.log(step, evaluation("val", val_ds, t.eval_batches))
        if checkpointer.due(step, last_step):
            checkpointer.save(step, elapsed_before + train_time)
        if step < last_step and stop.agreed(step):
            break

    if step < t.steps:  # stop_at or a signal: a checkpoint to resume from
        checkpointer.save(step, elapsed_before + train_time)
        metrics.close()
        why = "stop_at" if stop.signum is None else signal.Signals(stop.signum).name
        launcher = "rangerdl train"  # a distributed run resumes with as many workers
        if rt.distributed:
            launcher = f"torchrun --nproc-per-node={rt.world_size} -m rangerdl train"
        log.warning(
            "stopped at step %d of %d (%s); continue with: %s --resume %s",
            *(step, t.steps, why, launcher, run),
        )
        return {"run_dir": str(run), "step": step, "stopped": True, "signal": stop.signum}
    t0 = time.perf_counter()
    opt.finish()  # distributed: a final sync so every rank holds the global model
    train_time += time.perf_counter() - t0
    total_time = elapsed_before + train_time
    final = checkpointer.save(step, total_time)  # once, after the final sync, before evaluation
    n = t.final_eval_batches
    last_val = evaluation("val", val_ds, n) if val_ds is not splits.get("test") else {}
    test = evaluation("test", splits["test"], n) if "test" in splits else {}
    metrics.log(step, last_val | test | {"time/train_s": total_time})
    summary = {
        "run_dir": str(run),
        "step": step,
        "train_time_s": total_time,
        "samples_per_s": step * cfg.data.batch_size / max(total_time, 1e-9),
        "world_size": rt.world_size,
        **(
            {"replica_group": rt.replica_group, "replica_groups": rt.replica_groups}
            if rt.replica_group is not None
            else {}
        ),
        "model/params": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(final),
        **last_val,
        **test,
        **opt.comm_stats(),
    }
    if rt.is_main:
        atomic_write_text(run.summary, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    metrics.close(summary)
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingError(f"the run ended with non-finite {', '.join(bad)}; see {run.summary}")
    return summary
