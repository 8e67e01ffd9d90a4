"""The outer step of distributed Lookahead: the slow weights are the shared global model.

Every ``sync_every`` optimizer steps, with W workers holding fast weights theta_i and all holding the
same slow weights phi:

    phi <- phi + lr * (mean_i(theta_i) - phi)      (outer_momentum = 0: Lookahead; lr = 1: local SGD)
    theta_i <- phi

With outer momentum mu (SlowMo; with Nesterov: DiLoCo), on the averaged pseudo-gradient
d = mean_i(theta_i) - phi:  m <- mu m + d;  phi <- phi + lr (d + mu m if nesterov else m).

Communication per sync: one all-reduce of the parameters (ring: 2 (W-1)/W x values x bytes sent per
rank), or the same bytes as reduce-scatter + all-gather with ``shard_slow`` (each rank keeps 1/W of
phi and m), or half of them with ``comm_dtype="bf16"`` (the pseudo-gradient in bf16 via all-to-all,
summed in fp32, the mean all-gathered in bf16). ``overlap`` launches the all-reduce asynchronously
and merges it one step later, keeping the local progress made meanwhile:
theta_i <- phi_new + (theta_i(now) - theta_i(at launch)).

The fp32 paths reduce the weights themselves and apply ``phi.lerp_(mean, lr)``, so a single worker
reproduces single-process Lookahead/Ranger bit for bit.

This file is long because the four communication paths share one state layout and one checkpoint
format; each path is a short method.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rangerdl.distributed.cost import ring_bytes

log = logging.getLogger(__name__)

__all__ = ["OuterSync"]

BUFFER_POLICIES = ("average", "local", "broadcast")
COMM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class OuterSync:
    """Synchronises the parameters of ``param_groups`` across ``group`` every ``sync_every`` steps.

    Built by ``Ranger(..., group=...)`` and ``Lookahead(..., group=...)``; call :meth:`after_step`
    after every local optimizer step and :meth:`finish` once when training ends.

    At construction, parameters and buffers are broadcast from rank 0 (identical start) after a
    check that every rank has the same parameter and buffer shapes. The inner optimizer state
    (moments) stays local to each rank; only parameters (and floating buffers) travel.

    Args:
        param_groups: the optimizer's parameter groups (all parameters must share dtype and device).
        group: the ``torch.distributed`` process group.
        buffers: module buffers (e.g. BatchNorm running statistics) to keep in step.
        sync_every: steps between syncs.
        outer_lr: the outer step size (the Lookahead alpha).
        outer_momentum: outer momentum (0: plain Lookahead).
        nesterov: Nesterov outer momentum.
        overlap: all-reduce asynchronously, merge one step late.
        shard_slow: each rank keeps 1/W of the slow weights and outer momentum.
        comm_dtype: ``"fp32"`` or ``"bf16"`` (the pseudo-gradient on the wire).
        buffer_policy: ``"average"`` floating buffers at each sync (integer buffers such as
            ``num_batches_tracked`` are taken from rank 0), ``"broadcast"`` all from rank 0, or
            ``"local"``.
    """

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        group: Any,
        *,
        buffers: Iterable[Tensor] = (),
        sync_every: int,
        outer_lr: float,
        outer_momentum: float = 0.0,
        nesterov: bool = False,
        overlap: bool = False,
        shard_slow: bool = False,
        comm_dtype: str = "fp32",
        buffer_policy: str = "average",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("a process group was given but torch.distributed is not initialised")
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
        if not 0.0 < outer_lr <= 2.0:
            raise ValueError(f"outer_lr must be in (0, 2], got {outer_lr}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum}")
        if nesterov and outer_momentum == 0.0:
            raise ValueError("nesterov = true needs outer_momentum > 0")
        if comm_dtype not in COMM_DTYPES:
            raise ValueError(
                f"comm_dtype must be one of {', '.join(COMM_DTYPES)}, got {comm_dtype!r}"
            )
        if buffer_policy not in BUFFER_POLICIES:
            raise ValueError(
                f"buffers must be one of {', '.join(BUFFER_POLICIES)}, got {buffer_policy!r}"
            )
        if shard_slow and comm_dtype == "bf16":
            raise ValueError(
                "shard_slow and comm_dtype = 'bf16' cannot combine: a rank that keeps 1/W of the slow "
                "weights cannot form the pseudo-gradient (theta - phi) of the rest, so the weights "
                "themselves would travel in bf16; use one or the other"
            )
        if overlap and (shard_slow or comm_dtype != "fp32"):
            raise ValueError(
                "overlap combines only with the plain fp32 all-reduce (not with shard_slow or bf16): "
                "those need a second collective that depends on the first"
            )
        self.params = [p for g in param_groups for p in g["params"]]
        if not self.params:
            raise ValueError("no parameters to synchronise")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                "distributed Lookahead needs all parameters in one dtype on one device; got "
                f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}"
            )
        self.buffers = list(buffers)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sync_every, self.outer_lr, self.momentum = sync_every, outer_lr, outer_momentum
        self.nesterov, self.overlap, self.shard_slow = nesterov, overlap, shard_slow
        self.comm_dtype, self.buffer_policy = comm_dtype, buffer_policy
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.comm_device = torch.device("cpu") if dist.get_backend(group) == "gloo" else self.device
        self.numel = sum(p.numel() for p in self.params)
        self.shard = -(-self.numel // self.world_size)  # ceil
        self.padded = self.shard * self.world_size
        self.count = 0  # optimizer steps taken (all ranks equal)
        self.stats = {"bytes": 0, "syncs": 0, "time_s": 0.0, "broadcast_bytes": 0}
        self._pending: Any = None  # overlap: (work handle or None, reduced buffer, snapshot)
        self._check_same_shapes()
        self._broadcast_initial()
        flat = self._flatten_params()
        if shard_slow:
            lo = self.rank * self.shard
            self.slow = torch.zeros(self.shard, dtype=self.dtype, device=self.device)
            hi = min(lo + self.shard, self.numel)
            if hi > lo:
                self.slow[: hi - lo] = flat[lo:hi]
        else:
            self.slow = flat.clone()
        self.outer_buf = torch.zeros_like(self.slow) if outer_momentum > 0 else None

    # ------------------------------------------------------------------ public
    def after_step(self) -> None:
        """Count one optimizer step; merge a pending overlapped sync; sync when due."""
        self.count += 1
        if self._pending is not None:
            self._merge_pending()
        if self.count % self.sync_every == 0:
            self._sync()

    def finish(self) -> None:
        """Complete a pending sync and sync any local progress: every rank ends on phi."""
        if self._pending is not None:
            # Launched at the last step: nothing moved since the snapshot, so after the merge
            # every rank holds phi. Launched earlier: the steps since then are synced below.
            self._merge_pending()
        if self.count % self.sync_every != 0:
            self._sync(blocking=True)

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)``. With ``shard_slow`` this all-gathers (a collective)."""
        full = self._gather_slow() if self.shard_slow else self.slow
        return list(zip(self.params, self._views(full), strict=True))

    def comm_stats(self) -> dict[str, float]:
        """``comm/bytes``: bytes this rank sent for syncs (ring model, see the module docstring);
        ``comm/broadcast_bytes``: the one-time broadcast of rank 0's weights and buffers."""
        state_bytes = self.slow.numel() * self.slow.element_size()
        if self.outer_buf is not None:
            state_bytes *= 2
        return {
            "comm/bytes": float(self.stats["bytes"]),
            "comm/broadcast_bytes": float(self.stats.get("broadcast_bytes", 0)),
            "comm/syncs": float(self.stats["syncs"]),
            "comm/time_s": float(self.stats["time_s"]),
            "mem/outer_state_bytes": float(state_bytes),
        }

    def state_dict(self) -> dict[str, Any]:
        """Slow weights (this rank's shard with ``shard_slow``), outer momentum, counters, and an
        overlapped sync still in flight (waited for, so the merge resumes identically)."""
        state: dict[str, Any] = {
            "slow": self.slow.clone(),
            "count": self.count,
            "world_size": self.world_size,
            "shard_slow": self.shard_slow,
            "stats": dict(self.stats),
        }
        if self.outer_buf is not None:
            state["outer_momentum"] = self.outer_buf.clone()
        if self._pending is not None:
            work, reduced, snapshot = self._pending
            if work is not None:
                self._timed_wait(work)
                self._pending = (None, reduced, snapshot)
            state["pending_reduced"], state["pending_snapshot"] = reduced.clone(), snapshot.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size or state["shard_slow"] != self.shard_slow:
            raise ValueError(
                f"outer state saved with world_size={state['world_size']}, shard_slow={state['shard_slow']}; "
                f"this job has world_size={self.world_size}, shard_slow={self.shard_slow}"
            )
        if state["slow"].shape != self.slow.shape:
            raise ValueError(
                f"saved slow weights have shape {tuple(state['slow'].shape)}, expected {tuple(self.slow.shape)}"
            )
        self.slow.copy_(state["slow"])
        if self.outer_buf is not None:
            if "outer_momentum" not in state:
                raise ValueError(
                    "the saved outer state has no outer momentum, but outer_momentum > 0"
                )
            self.outer_buf.copy_(state["outer_momentum"])
        self.count = int(state["count"])
        self.stats = dict(state["stats"])
        self._pending = None
        if "pending_reduced" in state:
            self._pending = (
                None,
                state["pending_reduced"].clone(),
                state["pending_snapshot"].clone(),
            )

    # ------------------------------------------------------------------ internals
    def _views(self, flat: Tensor) -> list[Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    @torch.no_grad()
    def _flatten_params(self, out: Tensor | None = None) -> Tensor:
        if out is None:
            out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        torch._foreach_copy_(self._views(out), [p.detach() for p in self.params])
        return out

    @torch.no_grad()
    def _set_params(self, flat: Tensor) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], self._views(flat))

    def _ring_bytes(self, numel: int, element_size: int, factor: float) -> int:
        return ring_bytes(numel, element_size, self.world_size, factor=factor)

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, group=self.group, **kwargs)
        self.stats["time_s"] += time.perf_counter() - t0
        return out

    def _timed_wait(self, work: Any) -> None:
        t0 = time.perf_counter()
        work.wait()
        self.stats["time_s"] += time.perf_counter() - t0

    def _to_comm(self, t: Tensor) -> Tensor:
        return t if t.device == self.comm_device else t.to(self.comm_device)

    @torch.no_grad()
    def _check_same_shapes(self) -> None:
        mine = [(tuple(p.shape), str(p.dtype)) for p in self.params]
        mine_buffers = [(tuple(b.shape), str(b.dtype)) for b in self.buffers]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, (mine, mine_buffers), group=self.group)
        for rank, (params, buffers) in enumerate(everyone):
            for what, theirs, ours in (
                ("parameter", params, mine),
                ("buffer", buffers, mine_buffers),
            ):
                if theirs != ours:
                    diff = next(
                        (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
                        min(len(theirs), len(ours)),
                    )
                    raise ValueError(
                        f"rank {rank} and rank {self.rank} disagree on {what} shapes: {len(theirs)} vs "
                        f"{len(ours)} {what}s, first difference at index {diff}: "
                        f"{theirs[diff] if diff < len(theirs) else None} vs {ours[diff] if diff < len(ours) else None}"
                    )

    @torch.no_grad()
    def _broadcast_initial(self) -> None:
        for t in [p.detach() for p in self.params] + self.buffers:
            comm = self._to_comm(t)
            self._timed(dist.broadcast, comm, src=dist.get_global_rank(self.group, 0))
            if comm is not t:
                t.copy_(comm)
            self.stats["broadcast_bytes"] += t.numel() * t.element_size() if self.rank == 0 else 0

    @torch.no_grad()
    def _check_step_counts(self) -> None:
        counts = torch.tensor([self.count, -self.count], dtype=torch.int64)
        self._timed(dist.all_reduce, counts, op=dist.ReduceOp.MAX)
        high, low = int(counts[0]), -int(counts[1])
        if high != low:
            raise RuntimeError(
                f"ranks disagree on the number of optimizer steps at a sync (rank {self.rank} is at "
                f"step {self.count}; the ranks range from {low} to {high}). Every rank must take the same "
                "number of steps: give each the same number of batches"
            )

    @torch.no_grad()
    def _sync(self, blocking: bool = False) -> None:
        self._check_step_counts()
        self._sync_buffers()
        self.stats["syncs"] += 1
        if self.comm_dtype == "bf16":
            self._sync_bf16()
        elif self.shard_slow:
            self._sync_sharded()
        elif self.overlap and not blocking:
            self._launch_overlapped()
        else:
            self._sync_allreduce()

    def _sync_allreduce(self) -> None:
        mean = self._to_comm(self._flatten_params())
        self._timed(dist.all_reduce, mean)
        self.stats["bytes"] += self._ring_bytes(self.numel, mean.element_size(), 2)
        mean = mean.to(self.device).div_(self.world_size)
        self._outer_update(self.slow, mean)
        self._set_params(self.slow)

    def _launch_overlapped(self) -> None:
        snapshot = self._flatten_params()
        reduced = self._to_comm(snapshot.clone())
        work = self._timed(dist.all_reduce, reduced, async_op=True)
        self.stats["bytes"] += self._ring_bytes(self.numel, reduced.element_size(), 2)
        self._pending = (work, reduced, snapshot)

    def _merge_pending(self) -> None:
        work, reduced, snapshot = self._pending
        self._pending = None
        if work is not None:
            self._timed_wait(work)
        mean = reduced.to(self.device).div_(self.world_size)
        self._outer_update(self.slow, mean)
        with torch.no_grad():
            now = self._flatten_params()
            now.sub_(snapshot).add_(self.slow)  # phi_new + local progress since the launch
            self._set_params(now)

    def _sync_sharded(self) -> None:
        flat = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        self._flatten_params(flat[: self.numel])
        flat = self._to_comm(flat)
        mean = self._to_comm(torch.empty(self.shard, dtype=self.dtype, device=self.device))
        self._timed(dist.reduce_scatter_tensor, mean, flat)
        mean = mean.to(self.device).div_(self.world_size)
        self._outer_update(self.slow, mean)
        self._set_params(self._gather_slow())
        self.stats["bytes"] += self._ring_bytes(self.padded, flat.element_size(), 2)

    def _gather_slow(self) -> Tensor:
        full = self._to_comm(torch.empty(self.padded, dtype=self.dtype, device=self.device))
        self._timed(dist.all_gather_into_tensor, full, self._to_comm(self.slow))
        return full.to(self.device)[: self.numel]

    def _sync_bf16(self) -> None:
        delta = torch.zeros(self.padded, dtype=torch.float32, device=self.device)
        delta[: self.numel].copy_(self._flatten_params()).sub_(self.slow)  # theta - phi, in fp32
        sent = self._to_comm(delta.to(torch.bfloat16))
        received = torch.empty_like(sent)
        self._timed(dist.all_to_all_single, received, sent)  # shard j of every rank -> rank j
        mean_shard = received.view(self.world_size, self.shard).float().sum(0).div_(self.world_size)
        gathered = torch.empty_like(sent)
        self._timed(dist.all_gather_into_tensor, gathered, mean_shard.to(torch.bfloat16))
        self.stats["bytes"] += 2 * self._ring_bytes(self.padded, 2, 1)
        mean_delta = gathered.to(self.device)[: self.numel].to(self.dtype)
        self._outer_update(self.slow, mean_delta, is_delta=True)
        self._set_params(self.slow)

    def _outer_update(self, slow: Tensor, target: Tensor, is_delta: bool = False) -> None:
        """``slow`` moves toward the mean weights ``target`` (or by the mean ``delta``)."""
        if self.outer_buf is None:
            if is_delta:
                slow.add_(target, alpha=self.outer_lr)
            else:
                slow.lerp_(target, self.outer_lr)  # lerp: lr = 1 copies the mean exactly
            return
        delta = target if is_delta else target.sub_(slow)
        self.outer_buf.mul_(self.momentum).add_(delta)
        step = delta.add_(self.outer_buf, alpha=self.momentum) if self.nesterov else self.outer_buf
        slow.add_(step, alpha=self.outer_lr)

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        if self.buffer_policy == "local" or not self.buffers:
            return
        floats = [b for b in self.buffers if b.is_floating_point()]
        others = [b for b in self.buffers if not b.is_floating_point()]
        if self.buffer_policy == "broadcast":
            others, floats = self.buffers, []
        if floats:
            flat = self._to_comm(torch.cat([b.reshape(-1).float() for b in floats]))
            self._timed(dist.all_reduce, flat)
            self.stats["bytes"] += self._ring_bytes(flat.numel(), 4, 2)
            flat = flat.to(self.device).div_(self.world_size)
            offset = 0
            for b in floats:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        for b in others:
            comm = self._to_comm(b)
            self._timed(dist.broadcast, comm, src=dist.get_global_rank(self.group, 0))
            if comm is not b:
                b.copy_(comm)
            self.stats["bytes"] += b.numel() * b.element_size() if self.rank == 0 else 0
