"""Build the optimizer (and the module to call forward on) from ``[optim]`` and ``[distributed]``."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from rangerdl.distributed.cost import ring_bytes
from rangerdl.optim import Lookahead, Ranger
from rangerdl.train.config import Config
from rangerdl.train.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["build_optimizer", "make_local_optimizer"]


def make_local_optimizer(cfg: Config, params: Any, **ranger_sync: Any) -> torch.optim.Optimizer:
    """The ``[optim]`` optimizer; ``ranger_sync`` (``group=``, ...) makes Ranger distributed."""
    o = cfg.optim
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
            **ranger_sync,
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
        raise ValueError(f"[optim] name = {o.name!r}: expected ranger, adamw, radam or sgd")
    return Lookahead(inner, k=o.k, alpha=o.alpha) if o.lookahead else inner


class CommCounter:
    """Bytes and syncs for the torch baselines, counted like ``OuterSync`` counts its own: a ring
    all-reduce sends 2 (W-1)/W x values x bytes per rank. ``comm/time_s`` is measured only where
    the collective blocks (PostLocalSGD's averaging); DDP overlaps its all-reduce with backward."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.bytes, self.syncs, self.time_s, self.broadcast_bytes = 0, 0, 0.0, 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.bytes += ring_bytes(tensor.numel(), tensor.element_size(), self.world_size)

    def stats(self) -> dict[str, float]:
        out = {
            "comm/bytes": float(self.bytes),
            "comm/broadcast_bytes": float(self.broadcast_bytes),
            "comm/syncs": float(self.syncs),
        }
        if self.time_s:
            out["comm/time_s"] = self.time_s
        return out


def build_optimizer(cfg: Config, model: nn.Module, rt: Runtime) -> tuple[Any, nn.Module, Any]:
    """``(optimizer, forward_module, comm_stats)``. Single process: the ``[optim]`` optimizer, the
    model, no stats. Several processes: per ``[distributed] strategy``."""
    if not rt.distributed:
        return make_local_optimizer(cfg, model.parameters()), model, None
    strategy = cfg.distributed.strategy
    counter = CommCounter(rt.world_size)
    if rt.is_main:  # DDP and PostLocalSGD broadcast rank 0's weights and buffers once, as OuterSync
        tensors = [*model.parameters(), *model.buffers()]
        counter.broadcast_bytes = sum(t.numel() * t.element_size() for t in tensors)
    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None
        )

        def counting_allreduce(state, bucket):
            # (unannotated: DDP checks the annotations at runtime, and ours would be strings)
            counter.all_reduce(bucket.buffer())
            if bucket.is_last():
                counter.syncs += 1
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        return make_local_optimizer(cfg, ddp.parameters()), ddp, counter.stats
    if strategy == "post_local_sgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

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
                    counter.all_reduce(torch.empty(sum(p.numel() for p in model.parameters())))

        _broadcast_module(model)
        period = cfg.distributed.sync_every or cfg.optim.k
        # warmup_steps = period - 1: averages after steps k, 2k, ... as the Lookahead strategy syncs
        averager = CountingAverager(period=period, warmup_steps=period - 1)
        optimizer = PostLocalSGDOptimizer(
            optim=make_local_optimizer(cfg, model.parameters()), averager=averager
        )
        return optimizer, model, counter.stats
    # lookahead: the user-facing API itself, Ranger(..., group=) or Lookahead(any, group=)
    import torch.distributed as dist

    d = cfg.distributed
    sync: dict[str, Any] = {
        "group": dist.group.WORLD,
        "buffers": list(model.buffers()),
        "sync_every": d.sync_every or cfg.optim.k,
        "outer_lr": d.outer_lr or cfg.optim.alpha,
        "outer_momentum": d.outer_momentum,
        "nesterov": d.nesterov,
        "overlap": d.overlap,
        "shard_slow": d.shard_slow,
        "comm_dtype": d.comm_dtype,
        "buffer_policy": d.buffers,
    }
    local = make_local_optimizer(cfg, model.parameters())
    if isinstance(local, Ranger):
        ranger = make_local_optimizer(cfg, model.parameters(), **sync)
        return ranger, model, ranger.comm_stats  # type: ignore[attr-defined]
    inner = local.optimizer if isinstance(local, Lookahead) else local
    wrapped = Lookahead(inner, k=cfg.optim.k, alpha=cfg.optim.alpha, **sync)
    return wrapped, model, wrapped.comm_stats


def _broadcast_module(model: nn.Module) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, src=0)
