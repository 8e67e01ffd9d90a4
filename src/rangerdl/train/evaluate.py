"""Evaluation: a model on a split (all ranks share the work), periodic validation on the slow
weights, and ``rangerdl eval`` on a saved checkpoint."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rangerdl.optim import use_slow_weights
from rangerdl.train import checkpoint as ckpt
from rangerdl.train.config import load_config
from rangerdl.train.data import open_data
from rangerdl.train.models import build_model
from rangerdl.train.optimizers import TrainOptimizer
from rangerdl.train.run_folder import RunFolder
from rangerdl.train.runtime import Runtime, init_runtime
from rangerdl.train.task import Task

__all__ = ["evaluate", "evaluate_checkpoint", "validate"]

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
"""Seconds between progress log lines of a long evaluation when stderr is not a terminal."""


def _with_progress(batches: Iterable[Any], total: int, label: str) -> Iterator[Any]:
    """``batches`` unchanged, reporting progress on stderr: a tqdm bar on a terminal, else a log
    line every ``PROGRESS_EVERY_S`` seconds and one at the end."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(batches, total=total, desc=label, unit="batch", leave=False)
        return
    t0 = last = time.monotonic()
    for i, batch in enumerate(batches, 1):
        yield batch
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S or i == total:
            last = now
            left = (now - t0) / i * (total - i)
            log.info("%s: batch %d/%d (%.0f s, ~%.0f s left)", label, i, total, now - t0, left)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    task: Task,
    rt: Runtime,
    batch_size: int,
    max_batches: int = 0,
    *,
    progress: str = "",
) -> dict[str, float]:
    """The task's metrics (``loss``, ``accuracy``, ...) of ``model`` over ``dataset`` (the first
    ``max_batches * batch_size`` samples when ``max_batches > 0``); each rank evaluates a strided
    share and the sums are all-reduced, so every rank returns the same numbers. ``progress``: a
    label; rank 0 then reports progress on stderr (a bar on a terminal, else log lines)."""
    from rangerdl.data import collate

    n = len(dataset) if not max_batches else min(len(dataset), max_batches * batch_size)
    shard = torch.utils.data.Subset(dataset, range(rt.rank, n, rt.world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, collate_fn=collate)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    batches: Iterable[Any] = loader
    if progress and rt.is_main:
        batches = _with_progress(loader, len(loader), progress)
    for batch in batches:
        x, y = batch["x"].to(rt.device), batch["y"].to(rt.device)
        logits = model(x)
        losses = task.per_sample_losses(logits, y)
        loss_sum += losses.double().sum().item()
        if task.kind != "regression":
            correct += (logits.argmax(-1) == y).double().sum().item()
        count += losses.numel()
    model.train(was_training)
    return task.metrics(*rt.all_sum([loss_sum, correct, count]))


def validate(
    train_optimizer: TrainOptimizer,
    dataset: Any,
    task: Task,
    rt: Runtime,
    *,
    batch_size: int,
    max_batches: int,
    prefix: str,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`evaluate` on the slow weights (swapped in for the pass), tags ``prefix/name``;
    ``progress``: report it on stderr (for long final passes)."""
    with use_slow_weights(train_optimizer):
        metrics = evaluate(
            train_optimizer.raw_model,
            dataset,
            task,
            rt,
            batch_size,
            max_batches=max_batches,
            progress=f"final {prefix}" if progress else "",
        )
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def evaluate_checkpoint(
    path: Path, split: str = "test", *, trust_code: bool = False
) -> dict[str, Any]:
    """``rangerdl eval``: the ``model.pt`` of a checkpoint (or a run's latest valid one) on
    ``split`` of the run's dataset, in this process. ``trust_code``: the run's config may name a
    model factory to import (refused otherwise: see ``load_config``).

    Raises:
        FileNotFoundError: no checkpoint, or the run's ``config.json`` is missing.
        ValueError: the dataset has no such split; a damaged checkpoint; one that does not fit
            the model the config builds (``CheckpointMismatchError``, naming keys and shapes).
    """
    folder = ckpt.resolve(path)
    saved = RunFolder(folder.parent.parent).config
    if not saved.is_file():
        raise FileNotFoundError(
            f"{saved} does not exist; the checkpoint must sit in RUN_DIR/checkpoints/"
        )
    cfg = load_config(saved, run_folder=True, trust_code=trust_code)
    rt = init_runtime(cfg.train.device, "gloo", cfg.train.threads, cfg.distributed.timeout_s)
    splits = open_data(cfg.data, rt)
    if split not in splits:
        raise ValueError(f"the dataset has no {split!r} split; it has {', '.join(splits)}")
    task = Task.from_metadata(splits["train"].metadata)
    model = build_model(cfg.model.name, cfg.model.args, task.model_kwargs).to(rt.device)
    weights = folder / "model.pt"
    ckpt.load_state(
        model,
        ckpt.load(weights, mmap=True),  # shapes are checked before any tensor data is read
        path=weights,
        part="model",
        built_by=f"the model built from {saved} ([model] name={cfg.model.name!r}, "
        f"args={cfg.model.args!r}; from the dataset: {task.model_kwargs!r})",
        hint="was config.json's [model] or the dataset changed since the checkpoint was written?",
    )
    dataset = splits[split]
    log.info("evaluating %s on the %s split (%d samples)", folder, split, len(dataset))
    metrics = evaluate(model, dataset, task, rt, cfg.data.eval_batch_size, progress=f"eval {split}")
    return {"checkpoint": str(folder), **{f"{split}/{k}": v for k, v in metrics.items()}}
