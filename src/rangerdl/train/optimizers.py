"""Build the optimizer, the module to call forward on, and the sync from ``[optim]`` and
``[distributed]``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rangerdl.distributed import OuterSync
from rangerdl.distributed.cost import ring_bytes
from rangerdl.optim import Lookahead, Ranger
from rangerdl.train.choices import OPTIMIZERS, STRATEGIES
from rangerdl.train.config import Config, OptimConfig
from rangerdl.train.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["OPTIMIZERS", "STRATEGIES", "TrainOptimizer", "build_optimizer", "make_optimizer"]


def make_optimizer(
    o: OptimConfig, params: Iterable[Tensor], *, lookahead: bool = True
) -> torch.optim.Optimizer:
    """The ``[optim]`` optimizer over ``params``. ``lookahead=False`` gives the inner optimizer
    only (``Ranger(lookahead=False)``, or AdamW/RAdam/SGD without the ``Lookahead`` wrapper):
    distributed Lookahead attaches an ``OuterSync`` to it instead."""
    betas = (o.betas[0], o.betas[1])
    if o.name == "ranger":
        return Ranger(
            params,
            lr=o.lr,
            betas=betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            k=o.k,
            alpha=o.alpha,
            threshold=o.threshold,
            use_gc=o.use_gc,
            gc_conv_only=o.gc_conv_only,
            lookahead=lookahead,
        )
    inner: torch.optim.Optimizer
    if o.name == "adamw":
        inner = torch.optim.AdamW(
            params, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay
        )
    elif o.name == "radam":
        inner = torch.optim.RAdam(
            params,
            lr=o.lr,
            betas=betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            decoupled_weight_decay=True,
        )
    elif o.name == "sgd":
        inner = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        raise ValueError(f"[optim] name = {o.name!r}: expected one of {', '.join(OPTIMIZERS)}")
    return Lookahead(inner, k=o.k, alpha=o.alpha) if o.lookahead and lookahead else inner


@dataclass
class CommCounter:
    """Bytes and syncs for the torch baselines, counted as ``OuterSync`` counts its own
    (:func:`rangerdl.distributed.cost.ring_bytes`). ``comm/time_s`` is measured only where the
    collective blocks (PostLocalSGD's averaging); DDP overlaps its all-reduce with backward."""

    world_size: int
    bytes: int = 0
    syncs: int = 0
    time_s: float = 0.0
    broadcast_bytes: int = 0

    def all_reduce(self, numel: int, element_size: int) -> None:
        self.bytes += ring_bytes(numel, element_size, self.world_size)

    def stats(self) -> dict[str, float]:
        out = {
            "comm/bytes": float(self.bytes),
            "comm/broadcast_bytes": float(self.broadcast_bytes),
            "comm/syncs": float(self.syncs),
        }
        if self.time_s:
            out["comm/time_s"] = self.time_s
        return out


@dataclass
class TrainOptimizer:
    """What the loop drives: step ``optimizer``, call ``model`` forward, evaluate and save the
    weights of ``slow_weights`` (see :func:`rangerdl.optim.use_slow_weights`), call ``finish()``
    when training ends."""

    optimizer: torch.optim.Optimizer
    """What the loop steps (Ranger, AdamW, Lookahead, PostLocalSGDOptimizer, ...)."""
    model: nn.Module
    """The module to call forward on: the DDP wrapper, or the raw model."""
    raw_model: nn.Module
    """The model itself (its ``state_dict`` is what is saved)."""
    sync: Any = None
    """Distributed Lookahead's outer sync, when ``strategy = "lookahead"`` across processes: an
    ``OuterSync``, or a ``FaultTolerantSync`` (``backend = "torchft"``)."""
    counter: CommCounter | None = None
    """Byte accounting of the torch baselines."""
    manager: Any = None
    """``backend = "torchft"``: the torchft ``Manager`` (shut down by :meth:`close`)."""

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)``: the model worth keeping; empty without Lookahead."""
        holder: Any = self.sync if self.sync is not None else self.optimizer
        method = getattr(holder, "slow_weights", None)
        return list(method()) if method is not None else []

    def comm_stats(self) -> dict[str, float]:
        """``comm/*`` (and ``mem/outer_state_bytes``) counters; empty in a single process."""
        if self.sync is not None:
            return self.sync.comm_stats()
        return self.counter.stats() if self.counter is not None else {}

    def finish(self) -> None:
        """Distributed Lookahead: a final sync, so every rank holds the slow weights."""
        if self.sync is not None:
            self.sync.finish()

    def close(self) -> None:
        """Distributed Lookahead: shut down the sync's thread and process group (not a
        collective; safe on every path that ends a run, errors and signals included)."""
        if self.sync is not None:
            self.sync.close()
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = None


def build_optimizer(cfg: Config, model: nn.Module, rt: Runtime) -> TrainOptimizer:
    """Single process: the ``[optim]`` optimizer. Several processes: per ``[distributed]
    strategy``; the initial weights and buffers are broadcast from rank 0 in every strategy.
    ``backend = "torchft"``: the inner optimizer with a ``FaultTolerantSync`` on a torchft
    ``Manager`` (every group builds the same initial weights from the same seed)."""
    if cfg.distributed.backend == "torchft":
        return _fault_tolerant(cfg, model, rt)
    if not rt.distributed:
        return TrainOptimizer(make_optimizer(cfg.optim, model.parameters()), model, model)
    strategy = cfg.distributed.strategy
    if strategy == "lookahead":
        inner = make_optimizer(cfg.optim, model.parameters(), lookahead=False)
        options = cfg.distributed.resolved(k=cfg.optim.k, alpha=cfg.optim.alpha)
        import torch.distributed as dist

        names = [name for name, _ in model.named_parameters()]
        buffers = list(model.named_buffers())
        sync = OuterSync(inner, dist.group.WORLD, options, buffers=buffers, param_names=names)
        return TrainOptimizer(inner, model, model, sync=sync)
    counter = CommCounter(rt.world_size)
    if rt.is_main:  # DDP and PostLocalSGD broadcast rank 0's weights and buffers once
        tensors = [*model.parameters(), *model.buffers()]
        counter.broadcast_bytes = sum(t.numel() * t.element_size() for t in tensors)
    if strategy == "ddp":
        ddp = _counting_ddp(model, rt, counter)
        optimizer = make_optimizer(cfg.optim, ddp.parameters())
        return TrainOptimizer(optimizer, ddp, model, counter=counter)
    assert strategy == "post_local_sgd", strategy
    period = cfg.distributed.resolved(k=cfg.optim.k, alpha=cfg.optim.alpha).sync_every
    optimizer = _post_local_sgd(cfg, model, counter, period)
    return TrainOptimizer(optimizer, model, model, counter=counter)


def _fault_tolerant(cfg: Config, model: nn.Module, rt: Runtime) -> TrainOptimizer:
    import os

    from rangerdl.distributed.ft import FaultTolerantSync, connect

    d = cfg.distributed
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust logs: warnings only
    local_group = None  # a replica group of several processes: its torchrun job's group
    if rt.distributed:
        import torch.distributed as dist

        local_group = dist.group.WORLD
    manager = connect(
        d.lighthouse or os.environ["TORCHFT_LIGHTHOUSE"],
        f"group{rt.replica_group}",
        min_replicas=d.min_replicas,
        hostname=d.hostname or None,
        timeout_s=d.timeout_s,
        quorum_timeout_s=d.quorum_timeout_s,
        device=rt.device,
        local_group=local_group,
    )
    try:
        inner = make_optimizer(cfg.optim, model.parameters(), lookahead=False)
        options = d.resolved(k=cfg.optim.k, alpha=cfg.optim.alpha)
        sync = FaultTolerantSync(
            inner,
            manager,
            options,
            agreement=cfg.rank_agreed(),
            buffers=model.buffers(),
            local_group=local_group,
        )
    except BaseException:
        manager.shutdown(wait=False)
        raise
    return TrainOptimizer(inner, model, model, sync=sync, manager=manager)


def _counting_ddp(model: nn.Module, rt: Runtime, counter: CommCounter) -> nn.Module:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device] if rt.device.type == "cuda" else None
    )

    def counting_allreduce(state, bucket):
        # (unannotated: DDP checks the annotations at runtime, and ours would be strings)
        buffer = bucket.buffer()
        counter.all_reduce(buffer.numel(), buffer.element_size())
        if bucket.is_last():
            counter.syncs += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    return ddp


def _post_local_sgd(cfg: Config, model: nn.Module, counter: CommCounter, period: int) -> Any:
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    numel = sum(p.numel() for p in model.parameters())

    class CountingAverager(PeriodicModelAverager):
        def average_parameters(self, params: Any) -> None:
            due = (
                self.step >= self.warmup_steps
                and (self.step - self.warmup_steps) % self.period == 0
            )
            t0 = time.perf_counter()
            super().average_parameters(params)
            if due:
                counter.time_s += time.perf_counter() - t0
                counter.syncs += 1
                counter.all_reduce(numel, 4)

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    # warmup_steps = period - 1: averages after steps k, 2k, ... as the Lookahead strategy syncs
    averager = CountingAverager(period=period, warmup_steps=period - 1)
    return PostLocalSGDOptimizer(
        optim=make_optimizer(cfg.optim, model.parameters()), averager=averager
    )
