"""The outer optimizer of distributed Lookahead: the slow weights are the shared global model.

``OuterSync`` attaches to any ``torch.optim.Optimizer`` (the inner optimizer) the way torchft's
``LocalSGD`` does: a step post-hook counts optimizer steps and syncs every ``sync_every`` of them,
and state-dict hooks put the outer state (slow weights, outer momentum, the step clock) into the
optimizer's own ``state_dict()``. The inner optimizer never knows. The math is in
:class:`~rangerdl.distributed.options.SyncOptions`.

Communication per sync: one all-reduce of the parameters (ring: 2 (W-1)/W x values x bytes sent per
rank, :func:`rangerdl.distributed.cost.ring_bytes`), or the same bytes as reduce-scatter +
all-gather with ``shard_slow`` (each rank keeps 1/W of the slow weights and outer momentum), or
with ``compression`` the pseudo-gradient encoded (bf16, int8/int4/int2 blockwise absmax, top-k:
:mod:`rangerdl.distributed.compression`) via all-to-all, decoded and summed in fp32, the mean
encoded again and all-gathered (:func:`rangerdl.distributed.cost.compressed_sync_bytes`); at 2
ranks, where it sends the same bytes, one all-gather of the payloads, each rank decoding the
other's and summing in fp32 (the mean is not encoded again); with
``error_feedback`` what each encoding lost is kept and added to the next one. ``overlap`` launches the sync asynchronously and merges it
``overlap_steps`` optimizer steps later (Streaming DiLoCo's tau, Douillard et al. 2025; torchft's
``fragment_sync_delay``). With ``eager`` (the default) each rank takes the outer step at launch
with its own pseudo-gradient standing in for the mean, phi_i, and trains on from there; the merge
adds phi_new - phi_i (nothing when the ranks agree: one rank is single-process Lookahead exactly).
Without it a rank trains on from its own weights and the merge keeps the progress made meanwhile:
theta_i <- phi_new + (theta_i(now) - theta_i(at launch)). The fp32 all-reduce is one async
collective; the compressed exchange is two dependent ones (the all-gather needs the summed all-to-all),
so it runs on a worker thread over a second process group with the same ranks, which nothing
else uses (collectives on one group must be issued in the same order on every rank; the
training loop's own collectives stay on ``process_group``).

The fp32 paths reduce the weights themselves and apply ``phi.lerp_(mean, outer_lr)``, the same
operation as single-process Lookahead, so one worker reproduces ``Ranger``/``Lookahead`` bit for
bit.

Why ``rangerdl.optim.Lookahead`` and this class are two things, although both keep slow weights:
single-process Lookahead keeps a clock per parameter (a parameter without a gradient does not
advance, as torch optimizers skip it) inside the optimizer's state, with no dependency beyond
torch, so ``from rangerdl import Lookahead`` is a drop-in for anyone. The outer sync needs one
clock shared by all ranks (the count of ``step()`` calls), flat buffers for collectives, and
``torch.distributed``. Making Lookahead an ``OuterSync`` over a group of one would bring
``torch.distributed`` into ``optim`` and change its clock; keeping the two apart costs one
``lerp`` written twice, and the W = 1 identity test ties them together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from rangerdl.distributed import release
from rangerdl.distributed.compression import Codec, exchange_mean
from rangerdl.distributed.cost import ring_bytes
from rangerdl.distributed.options import SyncOptions
from rangerdl.optim import Lookahead, Ranger

log = logging.getLogger(__name__)

__all__ = ["OuterSync", "distributed_ranger", "inner_options", "outer_step"]


class _Pending(NamedTuple):
    """An overlapped sync in flight: its work handle, the buffer that receives the result, this
    rank's weights when it was launched, the optimizer step that launched it, and what the
    buffer holds once done: the sum of the ranks' weights (fp32) or the mean pseudo-gradient,
    padded (compressed exchange, decoded in fp32)."""

    work: Any  # the async work handle or the worker thread's Future, None once waited for
    reduced: Tensor
    snapshot: Tensor
    launched_at: int
    is_delta: bool = False
    estimate: Tensor | None = None  # ``eager``: the slow weights this rank estimated at launch
    baseline: int = -1  # ``reduced``'s reference count before the launch (``release.settle``)
    holder: Any = None  # ``release.hold`` on ``reduced`` while the collective may hold it


_THREAD_PREFIX = "rangerdl-sync"


class _SideChannel:
    """The overlapped compressed exchange's worker thread and its own process group (same ranks).
    Closed by ``OuterSync.finish``/``close``, and by a finalizer when an ``OuterSync`` that was
    never closed is garbage collected or the interpreter exits: no thread outlives it, nor does
    the group, with one exception: see :func:`_side_group`."""

    def __init__(self, process_group: dist.ProcessGroup, backend: str) -> None:
        self.group, self.owned = _side_group(process_group, backend)
        self.executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=_THREAD_PREFIX
        )

    def close(self) -> None:
        """Join the thread (it finishes an exchange in flight: every collective it runs has
        settled when it returns), then destroy the group, which joins gloo's threads."""
        if threading.current_thread().name.startswith(_THREAD_PREFIX):
            # The garbage collector ran the finalizer on the exchange's own thread, which cannot
            # join itself; it ends when its exchange does, and the interpreter joins it at exit.
            if self.executor is not None:
                self.executor.shutdown(wait=False)
            return
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        if self.group is not None and self.owned:
            group, self.group = self.group, None
            # destroy_process_group() (all groups) may have done it, or the job is gone
            with contextlib.suppress(ValueError, RuntimeError, KeyError):
                dist.destroy_process_group(group)


_subgroup_sides: dict[tuple[int, ...], Any] = {}


def _side_group(process_group: dist.ProcessGroup, backend: str) -> tuple[Any, bool]:
    """A new group with the ranks of ``process_group``, and whether the caller owns it.

    Over the whole job the new group is named by torch's group counter, which every rank advances
    alike, so a group made again after one was destroyed (``finish``, then training goes on; a
    second ``OuterSync``) is a new rendezvous. Over a subgroup only its members call, so torch
    names the group by a hash of its ranks: a second group of the same ranks would meet the
    first one's stale rendezvous keys and hang. That group is made once per process and kept
    until ``destroy_process_group()``.
    """
    ranks = dist.get_process_group_ranks(process_group)
    if len(ranks) == dist.get_world_size():
        return dist.new_group(ranks=ranks, backend=backend), True
    key = tuple(sorted(ranks))
    group = _subgroup_sides.get(key)
    try:
        if group is not None and dist.get_process_group_ranks(group) == ranks:
            return group, False
    except (ValueError, RuntimeError, KeyError):
        pass  # destroyed with all groups since
    group = dist.new_group(ranks=ranks, backend=backend, use_local_synchronization=True)
    _subgroup_sides[key] = group
    return group, False


class OuterSync:
    """Synchronises the parameters of ``optimizer`` across ``process_group`` every
    ``options.sync_every`` calls of ``optimizer.step()``, keeping the slow weights.

    At construction, parameters and ``buffers`` are broadcast from rank 0 (identical start) after a
    check that every rank has the same parameter and buffer shapes and the same options. The inner
    optimizer's state (moments) stays local to each rank; only parameters (and floating buffers)
    travel. Call :meth:`finish` once when training ends (or use the object as a context manager,
    which finishes on a clean exit), so every rank holds the slow weights.

    Args:
        optimizer: the inner optimizer (AdamW, SGD, ``Ranger(lookahead=False)``, any
            ``torch.optim.Optimizer``). Its parameters must share one dtype and device. An
            optimizer that keeps its own slow weights (``Lookahead``, ``Ranger(lookahead=True)``)
            is refused: this object holds them.
        process_group: the ``torch.distributed`` process group (``dist.group.WORLD`` after
            ``init_process_group``).
        options: sync period, outer step and communication; ``sync_every = 0`` and
            ``outer_lr = 0`` take the optimizer's param-group ``k`` and ``alpha`` when it has them
            (``Ranger``), else are an error.
        buffers: module buffers (e.g. BatchNorm running statistics) to keep in step, as
            tensors or ``(name, tensor)`` pairs (``model.named_buffers()``).
        param_names: a name per parameter, in the optimizer's order. Default: the names
            torch's optimizers keep when given ``model.named_parameters()``. Ranks compare
            names, shapes and dtypes, so one whose parameters come in another order is refused
            even where the shapes agree; give names (or named parameters) for that check.

    Raises:
        ValueError: ``process_group`` is None or torch.distributed is not initialised; bad or
            conflicting options; parameters of several dtypes/devices; ranks that disagree on
            shapes or options (on every rank).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        process_group: dist.ProcessGroup | None,
        options: SyncOptions | None = None,
        *,
        buffers: Iterable[Tensor | tuple[str, Tensor]] = (),
        param_names: Sequence[str] | None = None,
    ) -> None:
        if process_group is None or not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "OuterSync needs an initialised process group: call "
                "torch.distributed.init_process_group(...) first and pass dist.group.WORLD (or a "
                "subgroup); before that dist.group.WORLD is None"
            )
        self.options = inner_options(optimizer, options, "OuterSync", "ranks")
        groups = optimizer.param_groups
        self.optimizer = optimizer
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("no parameters to synchronise")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                "distributed Lookahead needs all parameters in one dtype on one device; got "
                f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}"
            )
        named_buffers = [b if isinstance(b, tuple) else (None, b) for b in buffers]
        self.buffers = [b for _, b in named_buffers]
        self._names = {
            "parameter": _param_names(groups, param_names, len(self.params)),
            "buffer": [name for name, _ in named_buffers],
        }
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        backend = dist.get_backend(process_group)
        self.comm_device = torch.device("cpu") if backend == "gloo" else self.device
        self.numel = sum(p.numel() for p in self.params)
        self.shard = -(-self.numel // self.world_size)  # ceil
        self.padded = self.shard * self.world_size
        self.step = 0  # optimizer steps taken (all ranks equal)
        self.stats = {"bytes": 0, "syncs": 0, "time_s": 0.0, "broadcast_bytes": 0, "codec_s": 0.0}
        payload = self.options.compression
        self._codec = (
            None
            if payload == "none"
            else Codec(payload, self.options.block_size, self.options.topk_density)
        )
        # the exchange: at 2 ranks one all-gather of the payloads sends what the all-to-all and
        # the all-gather of the re-encoded mean do, with a third less decoding and encoding and
        # no second rounding; beyond 2 the all-gather would send W/2 times the bytes
        self._mode = "all_gather" if self.world_size == 2 else "all_to_all"
        feedback = self._codec is not None and self.options.error_feedback
        # error feedback: what this rank's payload lost (padded to W chunks), and what its
        # encoding of its chunk of the mean lost (the all-gather half)
        self._residual = torch.zeros(self.padded, device=self.device) if feedback else None
        self._mean_residual = torch.zeros(self.shard, device=self.device) if feedback else None
        # the compressed sync's work buffers (pseudo-gradient, payload, mean), made at first use
        # and kept: one exchange at a time uses them (an overlapped one is merged before the next
        # sync starts)
        self._buffers: dict[str, Tensor] = {}
        self._pending: _Pending | None = None
        self._check_ranks_agree()
        self._broadcast_initial()
        self._backend = backend
        self._side: _SideChannel | None = None
        self._side_finalizer: weakref.finalize | None = None
        self._open_side()
        flat = self._flatten_params()
        if self.options.shard_slow:
            lo = self.rank * self.shard
            self._slow = torch.zeros(self.shard, dtype=self.dtype, device=self.device)
            hi = min(lo + self.shard, self.numel)
            if hi > lo:
                self._slow[: hi - lo] = flat[lo:hi]
        else:
            self._slow = flat.clone()
        self._momentum_buffer = (
            torch.zeros_like(self._slow) if self.options.outer_momentum > 0 else None
        )
        self._hooks = [
            optimizer.register_step_post_hook(lambda *_: self.after_step()),
            optimizer.register_state_dict_post_hook(self._state_dict_hook),
            optimizer.register_load_state_dict_pre_hook(self._load_state_dict_hook),
        ]

    # ------------------------------------------------------------------ public
    def after_step(self) -> None:
        """Count one optimizer step; merge a pending overlapped sync; sync when due. Called by the
        optimizer's step post-hook: do not call it yourself."""
        if sum(len(g["params"]) for g in self.optimizer.param_groups) != len(self.params):
            raise RuntimeError(
                "the optimizer's parameters changed after OuterSync was attached "
                "(add_param_group?): new parameters would never be synchronised and ranks would "
                "diverge. Add every param group before creating OuterSync"
            )
        self.step += 1
        due = self._due(self.step)
        if self._pending is not None and (
            due or self.step - self._pending.launched_at >= self.options.overlap_steps
        ):
            self._merge_pending()
        if due:
            self._sync()

    def finish(self) -> None:
        """Complete a pending sync and sync any local progress: every rank ends on the slow
        weights. A collective: call it on every rank. Ranks at different step counts get a
        ``RuntimeError`` (on every rank, at once) instead of a hang."""
        self._check_step_counts()
        if self._pending is not None:
            # Launched at the last step: nothing moved since the snapshot, so after the merge
            # every rank holds the slow weights. Launched earlier: the steps since then are synced.
            self._merge_pending()
        if not self._due(self.step):
            self._sync(blocking=True, checked=True)
        self._close_side()  # opened again by a later overlapped sync, if training goes on

    def close(self) -> None:
        """Detach from the optimizer (remove the hooks); the optimizer goes on as a local one.
        An overlapped sync still in flight is waited for (not merged), and the overlapped
        exchange's thread and process group are shut down. Not a collective: safe after an
        error, when other ranks may be gone. Idempotent."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._pending is not None and self._pending.work is not None:
            try:
                self._wait_pending()
            except Exception as exc:  # a peer died mid-sync: nothing to merge any more
                log.debug("an overlapped sync failed while closing: %s", exc)
        self._close_side()

    def __enter__(self) -> OuterSync:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:  # after an error other ranks may be gone: no collective then
            self.finish()
        self.close()

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)`` for every parameter, the model worth evaluating and
        saving (between syncs the parameters hold this rank's fast weights). With ``shard_slow``
        this all-gathers: call it on every rank."""
        full = self._gather_slow() if self.options.shard_slow else self._slow
        return list(zip(self.params, self._views(full), strict=True))

    def comm_stats(self) -> dict[str, float]:
        """``comm/bytes``: bytes this rank sent for syncs (ring model, see the module docstring);
        ``comm/broadcast_bytes``: the one-time broadcast of rank 0's weights and buffers;
        ``comm/syncs``; ``comm/time_s`` (seconds in collectives); with ``compression``,
        ``comm/codec_s`` (seconds encoding and decoding; the bytes are the encoded payloads,
        values, scales and positions, as handed to the collectives); ``mem/outer_state_bytes``
        (slow weights, outer momentum, error-feedback residuals)."""
        state_bytes = self._slow.numel() * self._slow.element_size()
        if self._momentum_buffer is not None:
            state_bytes *= 2
        for kept in (self._residual, self._mean_residual):
            state_bytes += 0 if kept is None else kept.numel() * kept.element_size()
        out = {
            "comm/bytes": float(self.stats["bytes"]),
            "comm/broadcast_bytes": float(self.stats.get("broadcast_bytes", 0)),
            "comm/syncs": float(self.stats["syncs"]),
            "comm/time_s": float(self.stats["time_s"]),
            "mem/outer_state_bytes": float(state_bytes),
        }
        if self._codec is not None:
            out["comm/codec_s"] = float(self.stats.get("codec_s", 0.0))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Slow weights (this rank's shard with ``shard_slow``), outer momentum buffer, the step
        clock, the compression and its error-feedback residuals (``error_feedback``: this rank's,
        ``(W ceil(n/W),)``; ``error_feedback_mean``: its chunk of the mean, ``(ceil(n/W),)``, fp32),
        and an overlapped sync still in flight (waited for, so the merge resumes
        identically). Also saved inside ``optimizer.state_dict()["outer"]`` by a hook."""
        state: dict[str, Any] = {
            "slow_weights": self._slow.clone(),
            "step": self.step,
            "world_size": self.world_size,
            "shard_slow": self.options.shard_slow,
            "stats": dict(self.stats),
        }
        if self._momentum_buffer is not None:
            state["momentum_buffer"] = self._momentum_buffer.clone()
        if self._pending is not None:
            self._wait_pending()  # the exchange's thread updates the mean residual
        state["compression"] = self.options.compression
        if self._residual is not None and self._mean_residual is not None:
            state["error_feedback"] = self._residual.clone()
            state["error_feedback_mean"] = self._mean_residual.clone()
        if self._pending is not None:  # waited for above
            state["pending_reduced"] = self._pending.reduced.clone()
            state["pending_snapshot"] = self._pending.snapshot.clone()
            state["pending_launched_at"] = self._pending.launched_at
            state["pending_is_delta"] = self._pending.is_delta
            if self._pending.estimate is not None:
                state["pending_estimate"] = self._pending.estimate.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. Raises ``ValueError`` when it was saved with
        another world size, sharding, compression or shape, or lacks the outer momentum or the
        error-feedback residuals this job needs."""
        shard_slow = self.options.shard_slow
        if state["world_size"] != self.world_size or state["shard_slow"] != shard_slow:
            raise ValueError(
                f"outer state saved with world_size={state['world_size']}, "
                f"shard_slow={state['shard_slow']}; this job has world_size={self.world_size}, "
                f"shard_slow={shard_slow}"
            )
        if state["slow_weights"].shape != self._slow.shape:
            raise ValueError(
                f"saved slow weights have shape {tuple(state['slow_weights'].shape)}, "
                f"expected {tuple(self._slow.shape)}"
            )
        self._slow.copy_(state["slow_weights"])
        if self._momentum_buffer is not None:
            if "momentum_buffer" not in state:
                raise ValueError(
                    "the saved outer state has no outer momentum buffer, but outer_momentum > 0"
                )
            self._momentum_buffer.copy_(state["momentum_buffer"])
        self._load_residuals(state)
        self.step = int(state["step"])
        self.stats = {"codec_s": 0.0, **state["stats"]}
        self._pending = None
        self._buffers = {}  # an exchange still in flight keeps writing to the old ones
        if "pending_reduced" in state:
            self._pending = _Pending(
                None,
                state["pending_reduced"].clone(),
                state["pending_snapshot"].clone(),
                # saved before overlap_steps existed: launched at the step the state was saved
                int(state.get("pending_launched_at", state["step"])),
                bool(state.get("pending_is_delta", False)),
                state["pending_estimate"].clone() if "pending_estimate" in state else None,
            )

    # ------------------------------------------------------------------ internals
    def _load_residuals(self, state: dict[str, Any]) -> None:
        saved = state.get("compression", self.options.compression)
        if saved != self.options.compression:
            raise ValueError(
                f"outer state saved with compression={saved!r}; this job has "
                f"compression={self.options.compression!r}"
            )
        for key, kept in (
            ("error_feedback", self._residual),
            ("error_feedback_mean", self._mean_residual),
        ):
            if kept is None:
                continue
            if key not in state:
                raise ValueError(
                    f"the saved outer state has no {key!r} residual, but error_feedback = true"
                )
            if state[key].shape != kept.shape:
                raise ValueError(
                    f"saved {key!r} has shape {tuple(state[key].shape)}, expected {tuple(kept.shape)}"
                )
            kept.copy_(state[key])

    def _due(self, step: int) -> bool:
        """Whether a sync ends optimizer step ``step``."""
        return step <= self.options.sync_every_warmup_steps or step % self.options.sync_every == 0

    def _warm(self, step: int) -> bool:
        """Whether the sync ending step ``step`` is a warm-up one (plain averaging)."""
        return step <= self.options.sync_every_warmup_steps

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

    def _state_dict_hook(self, optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state["outer"] = self.state_dict()
        return state

    def _load_state_dict_hook(self, optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        state, outer = split_outer_state(optimizer, state, "an OuterSync")
        self.load_state_dict(outer)
        return state

    def _timed(self, fn: Any, *tensors: Tensor, **kwargs: Any) -> None:
        """The blocking collective ``fn(*tensors, group=process_group, **kwargs)``, timed; it
        returns once gloo's threads let go of ``tensors`` (:mod:`rangerdl.distributed.release`)."""
        t0 = time.perf_counter()
        release.blocking(fn, tensors, *tensors, group=self.process_group, **kwargs)
        self.stats["time_s"] += time.perf_counter() - t0

    def _open_side(self) -> None:
        """The overlapped compressed exchange's thread and group (a collective on
        ``process_group``: every rank opens it at the same point)."""
        if self._side is None and self.options.overlap and self._codec is not None:
            self._side = _SideChannel(self.process_group, self._backend)
            self._side_finalizer = weakref.finalize(self, self._side.close)

    def _close_side(self) -> None:
        if self._side_finalizer is not None:
            self._side_finalizer()  # calls _SideChannel.close once, then detaches
            self._side_finalizer, self._side = None, None

    def _wait_pending(self) -> None:
        """Wait (timed) for the overlapped sync in flight; its buffer is then free of the
        process group's threads."""
        assert self._pending is not None
        work = self._pending.work
        self._pending = self._pending._replace(work=None)
        if work is None:
            return
        t0 = time.perf_counter()
        if isinstance(work, Future):
            # re-raises what failed on the worker thread (which settled); its time in
            # collectives is the wait counted here, its decoding and encoding is the codec's
            self.stats["codec_s"] = self.stats.get("codec_s", 0.0) + work.result()[1]
        else:
            work.wait()
            del work  # the handle holds the buffer too
            pending = self._pending
            release.settle([pending.reduced], [pending.baseline], pending.holder)
            self._pending = pending._replace(holder=None)
        self.stats["time_s"] += time.perf_counter() - t0

    def _to_comm(self, t: Tensor) -> Tensor:
        return t if t.device == self.comm_device else t.to(self.comm_device)

    @torch.no_grad()
    def _check_ranks_agree(self) -> None:
        """Every rank must have the same parameter and buffer shapes and the same options; a
        difference is the same ``ValueError`` on every rank, naming it, instead of a hang."""

        def described(names: list[str | None], tensors: list[Tensor]) -> list[tuple[Any, ...]]:
            return [
                (tuple(t.shape), str(t.dtype))
                if name is None
                else (name, tuple(t.shape), str(t.dtype))
                for name, t in zip(names, tensors, strict=True)
            ]

        mine = {
            "parameter": described(self._names["parameter"], self.params),
            "buffer": described(self._names["buffer"], self.buffers),
            "option": sorted(dataclasses.asdict(self.options).items()),
        }
        # A digest first, through a collective that settles (rangerdl.distributed.release); the
        # descriptions themselves only travel when the digests differ, to name the difference.
        digest = hashlib.sha256(repr(mine).encode()).digest()[:8]
        value = int.from_bytes(digest, "little", signed=True)
        bounds = torch.tensor([value, -value], dtype=torch.int64)
        # Not timed: this first collective also waits for the ranks still starting up.
        release.blocking(
            dist.all_reduce, [bounds], bounds, op=dist.ReduceOp.MAX, group=self.process_group
        )
        if int(bounds[0]) == -int(bounds[1]) == value:
            return
        everyone = release.all_gather_object(mine, group=self.process_group)
        for what in mine:
            reference = everyone[0][what]
            for rank, theirs in enumerate(everyone):
                if theirs[what] == reference:
                    continue
                ours = theirs[what]
                if what == "option":
                    keys = [a[0] for a, b in zip(reference, ours, strict=True) if a != b]
                    raise ValueError(
                        f"rank {rank} and rank 0 disagree on sync options {', '.join(keys)}: "
                        f"{dict(ours)} vs {dict(reference)}; every rank must use the same"
                    )
                diff = next(
                    (i for i, (a, b) in enumerate(zip(reference, ours, strict=False)) if a != b),
                    min(len(reference), len(ours)),
                )
                raise ValueError(
                    f"rank {rank} and rank 0 disagree on {what}s (names, shapes, dtypes): {len(ours)} vs "
                    f"{len(reference)} {what}s, first difference at index {diff}: "
                    f"{ours[diff] if diff < len(ours) else None} vs "
                    f"{reference[diff] if diff < len(reference) else None}"
                )

    @torch.no_grad()
    def _broadcast_initial(self) -> None:
        for t in [p.detach() for p in self.params] + self.buffers:
            comm = self._to_comm(t)
            self._timed(dist.broadcast, comm, src=dist.get_global_rank(self.process_group, 0))
            if comm is not t:
                t.copy_(comm)
            self.stats["broadcast_bytes"] += t.numel() * t.element_size() if self.rank == 0 else 0

    @torch.no_grad()
    def _check_step_counts(self) -> None:
        counts = torch.tensor([self.step, -self.step], dtype=torch.int64)
        self._timed(dist.all_reduce, counts, op=dist.ReduceOp.MAX)
        high, low = int(counts[0]), -int(counts[1])
        if high != low:
            raise RuntimeError(
                f"ranks disagree on the number of optimizer steps at a sync (rank {self.rank} is at "
                f"step {self.step}; the ranks range from {low} to {high}). Every rank must take the same "
                "number of steps: give each the same number of batches"
            )

    @torch.no_grad()
    def _sync(self, blocking: bool = False, checked: bool = False) -> None:
        if not checked:
            self._check_step_counts()
        self._sync_buffers()
        self.stats["syncs"] += 1
        if self.options.overlap and not blocking:
            self._launch_overlapped()
        elif self._codec is not None:
            self._sync_compressed()
        elif self.options.shard_slow:
            self._sync_sharded()
        else:
            self._sync_allreduce()

    def _sync_allreduce(self) -> None:
        mean = self._to_comm(self._flatten_params())
        self._timed(dist.all_reduce, mean)
        self.stats["bytes"] += self._ring_bytes(self.numel, mean.element_size(), 2)
        mean = mean.to(self.device).div_(self.world_size)
        self._outer_update(self._slow, mean, warm=self._warm(self.step))
        self._set_params(self._slow)

    def _launch_overlapped(self) -> None:
        snapshot = self._flatten_params()
        if self._codec is not None:
            self._open_side()  # after finish(), training went on
            assert self._side is not None and self._side.executor is not None
            sent = self._encode_delta(snapshot)
            mean = self._buffer("mean", (self.padded,), torch.float32)
            side = self._side.group
            work: Any = self._side.executor.submit(self._exchange, sent, mean, side)
            self.stats["bytes"] += self._payload_bytes(sent)
            self._pending = _Pending(work, mean, snapshot, self.step, is_delta=True)
        else:
            reduced = self._to_comm(snapshot.clone())
            holder = release.hold([reduced])
            baseline = release.use_counts([reduced])[0]
            t0 = time.perf_counter()
            work = dist.all_reduce(reduced, group=self.process_group, async_op=True)
            self.stats["time_s"] += time.perf_counter() - t0
            self.stats["bytes"] += self._ring_bytes(self.numel, reduced.element_size(), 2)
            self._pending = _Pending(
                work, reduced, snapshot, self.step, baseline=baseline, holder=holder
            )
        if self.options.eager:  # the outer step with this rank's weights as the mean, now
            estimate = self._slow.clone()
            momentum = None if self._momentum_buffer is None else self._momentum_buffer.clone()
            own = snapshot.sub(self._slow) if self._pending.is_delta else snapshot.clone()
            self._outer_update(
                estimate,
                own,
                is_delta=self._pending.is_delta,
                warm=self._warm(self.step),
                momentum=momentum,
            )
            self._pending = self._pending._replace(estimate=estimate)
            self._set_params(estimate)

    def _merge_pending(self) -> None:
        assert self._pending is not None
        self._wait_pending()
        _, reduced, snapshot, launched_at, is_delta, estimate, _, _ = self._pending
        self._pending = None
        warm = self._warm(launched_at)
        if is_delta:  # the mean pseudo-gradient, relative to phi at launch (phi has not moved)
            mean_delta = reduced.to(self.device)[: self.numel].to(self.dtype)
            self._outer_update(self._slow, mean_delta, is_delta=True, warm=warm)
        else:
            mean = reduced.to(self.device).div_(self.world_size)
            self._outer_update(self._slow, mean, warm=warm)
        if self.step == launched_at:  # no step since the launch: exactly the slow weights
            self._set_params(self._slow)  # (eager's estimate + error would differ by rounding)
            return
        with torch.no_grad():
            now = self._flatten_params()
            if estimate is not None:  # eager: trained on from the estimate; move by the error
                now.add_(self._slow.sub(estimate))
            else:
                now.sub_(snapshot).add_(self._slow)  # phi_new + local progress since the launch
            self._set_params(now)

    def _sync_sharded(self) -> None:
        flat = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        self._flatten_params(flat[: self.numel])
        flat = self._to_comm(flat)
        mean = self._to_comm(torch.empty(self.shard, dtype=self.dtype, device=self.device))
        self._timed(release.reduce_scatter_single, mean, flat)
        mean = mean.to(self.device).div_(self.world_size)
        self._outer_update(self._slow, mean, warm=self._warm(self.step))
        self._set_params(self._gather_slow())
        self.stats["bytes"] += self._ring_bytes(self.padded, flat.element_size(), 2)

    def _gather_slow(self) -> Tensor:
        full = self._to_comm(torch.empty(self.padded, dtype=self.dtype, device=self.device))
        self._timed(release.all_gather_single, full, self._to_comm(self._slow))
        return full.to(self.device)[: self.numel]

    def _encode_delta(self, flat: Tensor | None = None) -> Tensor:
        """The pseudo-gradient theta - phi (fp32, padded to W chunks), plus the kept residual
        with error feedback, encoded: ``(W, P)`` uint8 on the communication device (a buffer
        the next sync reuses). The residual becomes what this encoding lost. ``flat``: the
        flat parameters (default: flattened here)."""
        t0 = time.perf_counter()
        assert self._codec is not None
        delta = self._buffer("delta", (self.padded,), torch.float32)
        if flat is None:
            self._flatten_params(delta[: self.numel])
        else:
            delta[: self.numel].copy_(flat)
        delta[: self.numel].sub_(self._slow)
        delta[self.numel :].zero_()  # the padding, plus the residual's below
        shape = (self.world_size, self.shard)
        scratch: Tensor | None = None
        residual: Tensor | None = None
        if self._residual is not None and self._codec.sparse:
            # top-k: the pseudo-gradient in the residual's buffer (r + d is d + r, bit for
            # bit), encoded in place: it becomes the residual without a dense copy
            chunks = residual = self._residual.add_(delta).view(shape)
            scratch = delta.view(shape)
        else:
            if self._residual is not None:
                delta.add_(self._residual)
            chunks = delta.view(shape)
            if self._residual is not None:
                residual = self._residual.view(shape)
        payload_shape = (self.world_size, self._codec.nbytes(self.shard))
        payload = self._buffer("payload", payload_shape, torch.uint8)
        sent = None  # the exchange takes this rank's decoded payload as is (a sparse one: added)
        if self._mode == "all_gather" and not self._codec.sparse:
            sent = self._buffer("sent", shape, torch.float32)
        self._codec.encode(
            chunks, out=payload, dequantized=sent, residual=residual, scratch=scratch
        )
        self.stats["codec_s"] += time.perf_counter() - t0
        return self._to_comm(payload)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The work buffer ``name`` on ``self.device``, zeros when first made."""
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.zeros(shape, dtype=dtype, device=self.device)
        return buffer

    def _payload_bytes(self, payload: Tensor) -> int:
        """Bytes this rank sends in the exchange of ``payload`` (``W`` chunks of ``P`` bytes):
        ``2 (W-1) P`` (all-to-all, then all-gather of the mean), ``(W-1) W P`` (all-gather)."""
        if self._mode == "all_gather":
            return (self.world_size - 1) * self.world_size * payload.shape[1]
        return 2 * (self.world_size - 1) * payload.shape[1]

    def _exchange(self, payload: Tensor, mean: Tensor, group: Any) -> tuple[float, float]:
        """``mean`` <- the ranks' mean pseudo-gradient (fp32, padded) from their encoded
        ``payload``s (:func:`~rangerdl.distributed.compression.exchange_mean`). Blocking, on
        ``group``. Returns ``(seconds in collectives, seconds decoding and encoding)``."""
        assert self._codec is not None
        waited = [0.0]

        def run(fn: Any, *tensors: Tensor, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            release.blocking(fn, tensors, *tensors, group=group, **kwargs)
            waited[0] += time.perf_counter() - t0

        t0 = time.perf_counter()
        exchange_mean(
            self._codec,
            payload,
            self.shard,
            self.world_size,
            run,
            device=self.device,
            mean_residual=self._mean_residual,
            mode=self._mode,
            rank=dist.get_rank(group),
            own=self._buffers.get("sent"),
            out=mean,
        )
        return waited[0], time.perf_counter() - t0 - waited[0]

    def _sync_compressed(self) -> None:
        sent = self._encode_delta()
        mean = self._buffer("mean", (self.padded,), torch.float32)
        comm_s, codec_s = self._exchange(sent, mean, self.process_group)
        self.stats["time_s"] += comm_s
        self.stats["codec_s"] += codec_s
        self.stats["bytes"] += self._payload_bytes(sent)
        mean_delta = mean[: self.numel].to(self.dtype)
        self._outer_update(self._slow, mean_delta, is_delta=True, warm=self._warm(self.step))
        self._set_params(self._slow)

    def _outer_update(
        self,
        slow: Tensor,
        target: Tensor,
        is_delta: bool = False,
        warm: bool = False,
        momentum: Tensor | None = None,
    ) -> None:
        """:func:`outer_step` with this object's options and (default) outer momentum buffer."""
        buffer = self._momentum_buffer if momentum is None else momentum
        outer_step(slow, target, self.options, buffer, is_delta=is_delta, warm=warm)

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        if self.options.buffer_policy == "local" or not self.buffers:
            return
        floats = [b for b in self.buffers if b.is_floating_point()]
        others = [b for b in self.buffers if not b.is_floating_point()]
        if self.options.buffer_policy == "broadcast":
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
            self._timed(dist.broadcast, comm, src=dist.get_global_rank(self.process_group, 0))
            if comm is not b:
                b.copy_(comm)
            self.stats["bytes"] += b.numel() * b.element_size() if self.rank == 0 else 0


def split_outer_state(
    optimizer: Optimizer, state: dict[str, Any], owner: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer ``state_dict`` without its ``"outer"`` entry (what a sync's state-dict hook
    adds), and that entry; ``ValueError`` naming ``owner`` when it has none."""
    state = dict(state)
    outer = state.pop("outer", None)
    if outer is None:
        raise ValueError(
            f"{type(optimizer).__name__}.load_state_dict: no 'outer' entry; this state dict was "
            f"not saved by an optimizer with {owner} attached"
        )
    return state, outer


def outer_step(
    slow: Tensor,
    target: Tensor,
    options: SyncOptions,
    momentum: Tensor | None,
    *,
    is_delta: bool = False,
    warm: bool = False,
) -> None:
    """The outer step of :class:`~rangerdl.distributed.options.SyncOptions`, in place: ``slow``
    (the slow weights, flat) moves toward the mean weights ``target`` (or by the mean pseudo-gradient
    ``target`` when ``is_delta``), through the outer ``momentum`` buffer when one is given; a
    warm-up sync (``warm``) moves it onto the mean. ``target`` may be overwritten."""
    if momentum is None or warm:
        lr = 1.0 if warm else options.outer_lr
        if is_delta:
            slow.add_(target, alpha=lr)
        else:
            slow.lerp_(target, lr)  # lerp: lr = 1 copies the mean exactly
        return
    delta = target if is_delta else target.sub_(slow)
    momentum.mul_(options.outer_momentum).add_(delta)
    step = delta.add_(momentum, alpha=options.outer_momentum) if options.nesterov else momentum
    slow.add_(step, alpha=options.outer_lr)


def _param_names(
    groups: list[dict[str, Any]], given: Sequence[str] | None, count: int
) -> list[str | None]:
    """``given``, else the param groups' ``param_names`` (all groups or none), else Nones."""
    if given is not None:
        names = list(given)
        if len(names) != count:
            raise ValueError(f"param_names has {len(names)} names for {count} parameters")
        return list(names)
    if groups and all("param_names" in g for g in groups):
        return [name for g in groups for name in g["param_names"]]
    return [None] * count


def inner_options(
    optimizer: Optimizer, options: SyncOptions | None, holder: str, across: str
) -> SyncOptions:
    """``options`` (default :class:`SyncOptions`) resolved for the inner ``optimizer``:
    ``sync_every = 0`` and ``outer_lr = 0`` take its param groups' Lookahead ``k`` and ``alpha``.

    Raises:
        ValueError: the optimizer keeps its own slow weights (``Lookahead``,
            ``Ranger(lookahead=True)``), which ``holder`` holds ``across`` its peers; bad options.
    """
    if isinstance(optimizer, Lookahead) or (
        isinstance(optimizer, Ranger) and any(g["lookahead"] for g in optimizer.param_groups)
    ):
        raise ValueError(
            f"{type(optimizer).__name__} keeps its own Lookahead slow weights; {holder} holds "
            f"them across {across}: pass the inner optimizer (Ranger(..., lookahead=False), or "
            "the optimizer Lookahead wraps), or use rangerdl.distributed.distributed_ranger"
        )
    options = options or SyncOptions()
    groups = optimizer.param_groups
    return options.resolved(
        k=_group_value(groups, "k", "sync_every", options.sync_every),
        alpha=_group_value(groups, "alpha", "outer_lr", options.outer_lr),
    )


def _group_value(groups: list[dict[str, Any]], key: str, option: str, given: float) -> Any:
    """The optimizer's ``k``/``alpha`` for an option left at 0 (all groups must agree)."""
    if given:
        return given
    values = {g[key] for g in groups if key in g}
    if not values:
        raise ValueError(
            f"{option} = 0 means the optimizer's Lookahead {key!r}, but its param groups have "
            f"none: give {option}"
        )
    if len(values) > 1:
        raise ValueError(
            f"the param groups have different {key} {sorted(values)} but sync together: "
            f"give {option} explicitly"
        )
    return values.pop()


def distributed_ranger(
    params: Any,
    process_group: dist.ProcessGroup | None,
    options: SyncOptions | None = None,
    *,
    buffers: Iterable[Tensor | tuple[str, Tensor]] = (),
    **ranger_kwargs: Any,
) -> tuple[Ranger, OuterSync]:
    """Distributed Ranger in one line: ``Ranger(params, lookahead=False, **ranger_kwargs)`` (RAdam
    + gradient centralisation, the inner step) with an :class:`OuterSync` holding its Lookahead
    (``sync_every`` defaults to ``k``, ``outer_lr`` to ``alpha``). Returns ``(optimizer, sync)``:
    step the optimizer as usual; ``sync.finish()`` at the end; ``sync.slow_weights()`` to
    evaluate. One worker equals single-process ``Ranger`` bit for bit. Pass
    ``model.named_parameters()`` (and ``model.named_buffers()``) so that the ranks check they
    agree on the parameters by name, not only by shape.

    Raises:
        ValueError: as :class:`OuterSync` and :class:`~rangerdl.optim.Ranger`.
    """
    optimizer = Ranger(params, lookahead=False, **ranger_kwargs)
    return optimizer, OuterSync(optimizer, process_group, options, buffers=buffers)
