"""Build the optimizer (and the module to call forward on) from ``[optim]`` and ``[distributed]``."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

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


def build_optimizer(cfg: Config, model: nn.Module, rt: Runtime) -> tuple[Any, nn.Module]:
    """``(optimizer, forward_module)``. Single process: the ``[optim]`` optimizer and the model.
    Several processes: per ``[distributed] strategy``."""
    if not rt.distributed:
        return make_local_optimizer(cfg, model.parameters()), model
    strategy = cfg.distributed.strategy
    if strategy == "ddp":
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None
        )
        return make_local_optimizer(cfg, ddp.parameters()), ddp
    if strategy == "post_local_sgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        _broadcast_module(model)
        period = cfg.distributed.sync_every or cfg.optim.k
        averager = PeriodicModelAverager(period=period, warmup_steps=0)
        return PostLocalSGDOptimizer(
            optim=make_local_optimizer(cfg, model.parameters()), averager=averager
        ), model
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
        return make_local_optimizer(cfg, model.parameters(), **sync), model
    inner = local.optimizer if isinstance(local, Lookahead) else local
    return Lookahead(inner, k=cfg.optim.k, alpha=cfg.optim.alpha, **sync), model


def _broadcast_module(model: nn.Module) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t, src=0)
