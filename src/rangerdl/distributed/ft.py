"""Distributed Ranger on torchft: the outer sync across replica groups that may die and come back.

torchft (PyTorch's fault-tolerance library, ``pip install "rangerdl[ft]"``) keeps the membership:
a Lighthouse forms a quorum of the live replica groups at each sync, a group that died is left
out after a heartbeat timeout while the others go on, and a group that (re)starts heals from a
live peer instead of a checkpoint on disk. :class:`FaultTolerantSync` is distributed Lookahead's
outer sync (:class:`~rangerdl.distributed.sync.OuterSync`'s fp32 path, the same math) run through
a torchft ``Manager``:

1. every ``sync_every`` optimizer steps, ``manager.start_quorum()`` (blocking): the live groups
   agree on who takes part; a group behind the others receives their state here (below);
2. each group's weights are averaged over the groups taking part (``manager.allreduce``: a sum
   divided by the number of participants; a group that just healed sends zeros and is not
   counted); with a ``compression``, each group's pseudo-gradient is encoded instead, the payloads
   all-gathered on the manager's process group (a failure there is reported to the manager),
   and every group decodes and sums those of the groups taking part in fp32;
3. ``manager.should_commit()``: only when every group in the quorum finished the all-reduce do they
   apply the outer step (:func:`~rangerdl.distributed.sync.outer_step`) and continue from the new
   slow weights. A sync in which a member died is discarded by all: the slow weights stay as they
   were (never half-applied) and each group keeps its local progress, synced at the next one.

With ``overlap`` steps 1-2 run at the sync's step and the exchange is left in flight while the
group trains ``overlap_steps`` more steps; step 3 and the merge follow, as in
:class:`~rangerdl.distributed.sync.OuterSync`: the parameters move by what the slow weights moved,
keeping the steps trained meanwhile (``eager``: the outer step with this group's own weights is
applied at the launch and corrected at the merge; a discarded sync takes it back). Averaged
buffers (BatchNorm's statistics) take the mean of their values at the launch when it is merged.
The quorum stays blocking: a group heals at a sync's launch, never while one is in flight.

Healing sends the slow weights, the outer momentum, the step clock, the parameters, the inner
optimizer's ``state_dict()`` and whatever ``user_state`` returns (the data position): the state as
the sending peer had it at the start of that sync, which the healed group then syncs like the
others, so all end the sync with the same slow weights, bit for bit. Torchft's HTTP transport
carries it; this module reads it with torch's ``weights_only`` unpickler (tensors and plain types
only: nothing a peer sends can run code). A peer is otherwise trusted as in ``torch.distributed``:
run the Lighthouse and the groups on a private network.

A group that starts fresh trains from its own initial weights until its first sync, then takes
the others' state: start every group from the same seed (identical weights) and the only cost is
up to ``sync_every`` steps of its own.

A replica group may be several processes (a ``torchrun`` job, ``local_group``: its process
group), each an independent worker with its own data, as under ``torchrun`` alone. A sync then
reduce-scatters the group's weights inside it (each of its ``L`` ranks gets the group's mean of
one ``1/L`` chunk), rank ``r`` of every group exchanges chunk ``r`` with rank ``r`` of the other
groups (torchft's process group of that rank: ``1/L`` of the bytes across the slow link per
process), and the group all-gathers the mean chunks inside it; with ``shard_slow`` rank ``r``
keeps only chunk ``r`` of the slow weights and outer momentum, and all-gathers the new slow
weights instead. torchft asks every rank of a group to commit, and commits only when all of them
can, so a group applies a sync on all its ranks or on none; a healing group's rank ``r`` heals
from rank ``r`` of a live group. When one process of a group dies, torchrun ends and restarts the
whole group; its other processes on the host end at once rather than wait for that (torchrun
gives a process 30 s after its SIGTERM, and while one of them is alive the group stays in the
quorum, so the live groups would wait for it).

References: torchft (github.com/pytorch/torchft, ``torchft.local_sgd.DiLoCo`` and ``Manager``);
DiLoCo, Douillard et al. 2023 (arXiv 2311.08105); Lookahead, Zhang et al. 2019.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from rangerdl.distributed.compression import Codec
from rangerdl.distributed.cost import ring_bytes
from rangerdl.distributed.ft_group import (
    PeerWatch,
    connect,
    local_rank_and_size,
    require_torchft,
)
from rangerdl.distributed.options import SyncOptions
from rangerdl.distributed.release import (
    all_gather_single,
    blocking,
    reduce_scatter_single,
)
from rangerdl.distributed.sync import inner_options, outer_step, split_outer_state

__all__ = ["FaultTolerantSync", "connect", "require_torchft"]

log = logging.getLogger(__name__)

PROCESSES = "processes per replica group (torchrun --nproc-per-node)"
"""The agreement key a group of several processes adds: their number."""
HEADER = 16
"""Bytes at the start of a group's row in a compressed sync's all-gather: byte 0 says whether the
group takes part; the averaged buffers and config digests follow (fp32, padded to 16 bytes), then
the payload (16 keep its scales aligned)."""


@dataclasses.dataclass
class _InFlight:
    """A sync between its launch and its merge (:meth:`FaultTolerantSync._launch`)."""

    work: Any
    """The exchange's wait-able handle until waited for (``None`` after, or when it never
    started)."""
    launched_at: int
    warm: bool
    side: Tensor
    """What this group sent beside the weights (buffers, config digests; a group of several
    processes: their mean)."""
    sent: int
    """Bytes handed to the collective."""
    participating: bool
    snapshot: Tensor | None = None
    """Overlapped: the flat parameters at the launch (zero-padded as the slow weights)."""
    estimate: Tensor | None = None
    """Eager: the slow weights the parameters were moved to at the launch."""
    decided: bool = False
    committed: bool = False
    target: Tensor | None = None
    """Committed: the mean weights (or pseudo-gradient), shaped as the slow weights."""
    side_mean: Tensor | None = None
    residual: Tensor | None = None
    """Committed, with error feedback: what this group's payload lost."""


class FaultTolerantSync:
    """Synchronises the parameters of ``optimizer`` across torchft replica groups every
    ``options.sync_every`` calls of ``optimizer.step()``, keeping the slow weights (the module
    docstring has the protocol).

    Args:
        optimizer: the inner optimizer (``Ranger(lookahead=False)``, AdamW, ...): its parameters
            share one dtype and device.
        manager: from :func:`connect`. This object registers its state with it for healing.
        options: ``sync_every``, ``outer_lr``, ``outer_momentum``, ``nesterov``,
            ``sync_every_warmup_steps``, ``compression`` (``comm_dtype``), ``block_size``,
            ``topk_density``, ``error_feedback`` as in :class:`OuterSync` (``0``: the
            optimizer's ``k`` and ``alpha``). With a ``compression`` each group encodes its
            pseudo-gradient (its weights minus the slow weights, plus its error-feedback
            residual); the payloads are all-gathered on the manager's process group, and every
            group decodes those of the groups taking part and sums them in fp32 (never in the
            payload's dtype), so all get the same mean, bit for bit. A group keeps what its
            payload lost only when the sync is committed. With ``overlap`` the exchange runs
            while the group trains ``overlap_steps`` more steps, then the sync is committed
            (or discarded) and merged as :class:`OuterSync` merges it (``eager`` too).
            ``shard_slow``: with a ``local_group`` of ``L`` processes, each keeps ``1/L`` of the
            slow weights and outer momentum (blocking, uncompressed syncs, as in
            :class:`OuterSync`).
        user_state: ``(state_dict, load_state_dict)`` callables for what else a healed group
            needs, e.g. the data position; their value must be tensors and plain types.
        agreement: ``{key: value}`` every group must share (a training config; a group of
            several processes adds their number): a digest of
            each value (20 bits, fp32 parameters only) travels with every sync's all-reduce, and
            a sync whose mean digest differs from this group's raises ``ValueError`` naming the
            keys; a group that heals compares the values themselves (tensors and plain types
            only), before it takes anything from the peer.
        buffers: the model's buffers (``model.buffers()``): with ``buffer_policy = "average"``
            (the default) the floating-point ones (BatchNorm's running statistics) are averaged
            over the groups in each committed sync, as :class:`OuterSync` does; every buffer
            travels with a heal. ``"broadcast"`` needs a fixed rank 0 and is refused here.
        process_group: the process group given to the manager, which a compressed sync's
            all-gather runs on (default: the one :func:`connect` made).
        local_group: the ``torch.distributed`` process group of this replica group's processes
            when it has several (its ``torchrun`` job; the module docstring says how a sync
            runs then); the same one given to :func:`connect`. ``None``: one process.

    Raises:
        ImportError: torchft missing.
        ValueError: an option this sync cannot run, bad options, parameters of several
            dtypes/devices, an optimizer that keeps its own slow weights.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        manager: Any,
        options: SyncOptions | None = None,
        *,
        user_state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
        agreement: Mapping[str, Any] | None = None,
        buffers: Iterable[Tensor] | None = None,
        process_group: Any = None,
        local_group: Any = None,
    ) -> None:
        require_torchft()
        given = options or SyncOptions()
        self.options = inner_options(optimizer, given, "FaultTolerantSync", "replica groups")
        groups = optimizer.param_groups
        self.optimizer = optimizer
        self.manager = manager
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("no parameters to synchronise")
        if len({(p.dtype, p.device) for p in self.params}) > 1:
            raise ValueError("FaultTolerantSync needs all parameters in one dtype on one device")
        self.numel = sum(p.numel() for p in self.params)
        self.local_group = local_group
        self.local_rank, self.local_size = local_rank_and_size(local_group)
        self.span = -(-self.numel // self.local_size)
        """Values each process exchanges with the other groups: its chunk of the weights."""
        self.padded = self.span * self.local_size
        self._chunk = slice(self.local_rank * self.span, (self.local_rank + 1) * self.span)
        self.buffers = list(buffers or [])
        if self.options.buffer_policy == "broadcast" and self.buffers:
            raise ValueError(
                "buffer_policy = 'broadcast' is not available with torchft (no group is a fixed "
                "rank 0); use 'average' or 'local'"
            )
        self._averaged = (
            [b for b in self.buffers if b.is_floating_point()]
            if self.options.buffer_policy == "average"
            else []
        )
        self._buffer_numel = sum(b.numel() for b in self._averaged)
        self.step = 0
        self._agreement = dict(agreement or {})
        if self.local_size > 1:  # every group must cut the weights into as many chunks
            self._agreement[PROCESSES] = self.local_size
        self._digests = (
            _digests(self._agreement, self.params[0].device)
            if self.params[0].dtype == torch.float32
            else None
        )
        # (padded,), or this process's chunk (span,) with shard_slow; the padding stays 0
        slow = self._flatten()
        self._slow = slow[self._chunk].clone() if self.options.shard_slow else slow
        self._momentum = torch.zeros_like(self._slow) if self.options.outer_momentum > 0 else None
        self.process_group = process_group or getattr(manager, "rangerdl_process_group", None)
        payload = self.options.compression
        self._codec = (
            None
            if payload == "none"
            else Codec(payload, self.options.block_size, self.options.topk_density)
        )
        if self._codec is not None and self.process_group is None:
            raise ValueError(
                f"compression = {payload!r} needs the manager's process group: pass "
                "process_group= (the one given to the torchft Manager), or use connect()"
            )
        # error feedback: what this group's payloads lost, (n,) fp32
        feedback = self._codec is not None and self.options.error_feedback
        self._residual = torch.zeros(self.span, device=self._slow.device) if feedback else None
        self._buffers: dict[str, Tensor] = {}  # the compressed sync's work buffers, kept
        self.user_state = user_state
        """``(state_dict, load_state_dict)`` of what else a healed group needs (may be set after
        construction, before the first sync)."""
        self.stats = {"syncs": 0, "discarded": 0, "healed": 0, "bytes": 0, "time_s": 0.0}
        if self._codec is not None:
            self.stats["codec_s"] = 0.0
        self._healing = False
        self._pending: _InFlight | None = None  # an overlapped sync between launch and merge
        manager.register_state_dict_fn("rangerdl", self._load_heal_state, self._heal_state)
        self._peers = PeerWatch(local_group) if self.local_size > 1 else None
        self._hooks = [
            optimizer.register_step_post_hook(lambda *_: self.after_step()),
            optimizer.register_state_dict_post_hook(self._state_dict_hook),
            optimizer.register_load_state_dict_pre_hook(self._load_state_dict_hook),
        ]

    # ------------------------------------------------------------------ public
    def after_step(self) -> None:
        """Count one optimizer step; merge an overlapped sync that is due; sync when due (the
        optimizer's step post-hook calls it)."""
        self.step += 1
        due = self._due(self.step)
        pending = self._pending
        if pending is not None and (
            due or self.step - pending.launched_at >= self.options.overlap_steps
        ):
            self._merge()
        if due and self.options.overlap:
            self._launch(overlapped=True)
        elif due:
            self.sync()

    @torch.no_grad()
    def sync(self) -> bool:
        """One blocking sync now (normally called every ``sync_every`` steps), after merging an
        overlapped one still in flight; whether it was committed. A discarded sync changes
        nothing here but the counters."""
        if self._pending is not None:
            self._merge()
        self._launch(overlapped=False)
        return self._merge()

    def finish(self) -> bool:
        """Merge an overlapped sync in flight, then a last sync when the last step did not end
        with one (every group that finishes at the same step takes part), so the slow weights
        hold every group's last steps; whether the last sync was committed (``False`` when the
        last step ended with a blocking one, already counted)."""
        merged = self._merge() if self._pending is not None else False
        if self._due(self.step):
            return merged  # the last step ended with a sync: merged above, or blocking
        return self.sync()

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)`` for every parameter: the model worth evaluating (with
        ``shard_slow`` in a group of several processes, a collective: every rank calls it)."""
        return list(zip(self.params, self._views(self._full_slow()), strict=True))

    def close(self) -> None:
        """Detach from the optimizer (the manager is the caller's to shut down). An overlapped
        sync still in flight is waited for, not merged: safe after an error."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._peers is not None:  # the group's processes may end normally from here on
            self._peers.close()
        pending, self._pending = self._pending, None
        if pending is not None and pending.work is not None:
            with contextlib.suppress(Exception):  # a peer died mid-sync: nothing to merge
                pending.work.wait()

    def state_dict(self) -> dict[str, Any]:
        """The outer state for a checkpoint: slow weights ``(n,)`` (zero-padded to a multiple of
        the group's processes, or this process's chunk with ``shard_slow``), outer momentum, the step
        clock, the counters and the manager's step (so that a group restored from an older
        checkpoint than its peers' heals from them), and an overlapped sync in flight: waited
        for and decided (committed or not) now, so that its merge resumes identically. Also
        saved inside ``optimizer.state_dict()["outer"]`` by a hook."""
        pending = self._decide() if self._pending is not None else None
        state: dict[str, Any] = {
            "slow_weights": self._slow.clone(),
            "step": self.step,
            "stats": dict(self.stats),
            "manager": dict(self.manager.state_dict()),
        }
        if pending is not None:
            state["pending"] = {
                name: value.clone() if isinstance(value, Tensor) else value
                for name, value in vars(pending).items()
                if name not in ("work", "decided")
            }
        if self._momentum is not None:
            state["momentum_buffer"] = self._momentum.clone()
        if self._residual is not None:
            state["error_feedback"] = self._residual.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: slow weights of another shape, no outer momentum where this sync
                keeps one, no (or another shape of) error-feedback residual where this sync
                keeps one, or an overlapped sync in flight that is not this model's or that
                this sync (without ``overlap``) cannot merge. Checked before anything is
                loaded.
        """
        kept = state.get("error_feedback")
        if self._residual is not None and (
            not isinstance(kept, Tensor) or kept.shape != self._residual.shape
        ):
            raise ValueError(
                "the saved outer state has no error-feedback residual of shape "
                f"{tuple(self._residual.shape)}, but error_feedback = true with compression "
                f"= {self.options.compression!r}"
            )
        saved = None
        if "pending" in state:
            if not self.options.overlap:
                raise ValueError(
                    "the saved outer state has an overlapped sync in flight, but overlap = false: "
                    "resume with the options it was saved with"
                )
            saved = self._pending_from(state["pending"])
        self._load_outer(state)
        if self._residual is not None:
            assert isinstance(kept, Tensor)
            self._residual.copy_(kept)
        self.stats = {**self.stats, **state.get("stats", {})}
        if "manager" in state:
            self.manager.load_state_dict(state["manager"])
        pending, self._pending = self._pending, saved
        if pending is not None and pending.work is not None:
            with contextlib.suppress(Exception):  # its buffers are reused by the next sync
                pending.work.wait()

    def comm_stats(self) -> dict[str, float]:
        """``comm/syncs`` (committed), ``comm/discarded``, ``comm/healed``, ``comm/bytes``
        (handed to the collectives by this group in committed syncs: payloads, scales,
        indices and the one-byte header), ``comm/time_s`` (blocked in syncs, quorum included),
        and with a compression ``comm/codec_s`` (encoding and decoding)."""
        return {f"comm/{k}": float(v) for k, v in self.stats.items()}

    def _pending_from(self, saved: Any) -> _InFlight:
        """The overlapped sync a checkpoint saved in flight; ``ValueError`` naming what is
        missing or of the wrong kind."""
        expected = {f.name for f in dataclasses.fields(_InFlight)} - {"work", "decided"}
        if not isinstance(saved, dict) or set(saved) != expected:
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(
                f"the saved overlapped sync has keys {got}, expected {sorted(expected)}"
            )
        shapes = {
            "snapshot": (self.padded,),
            "estimate": (self.padded,),
            "target": tuple(self._slow.shape),
            "residual": (self.span,),
        }
        for name, shape in shapes.items():
            value = saved[name]
            if value is not None and (not isinstance(value, Tensor) or value.shape != shape):
                raise ValueError(
                    f"the saved overlapped sync's {name} is not a tensor of shape {shape}: not "
                    "this model"
                )
        return _InFlight(work=None, decided=True, **saved)

    # ------------------------------------------------------------------ healing
    def _heal_state(self) -> dict[str, Any]:
        self._healing = True  # the inner optimizer's state without the outer one (sent apart)
        try:
            # copied: torchft serves it until this group's next commit, and with overlap
            # the optimizer steps on meanwhile
            inner = copy.deepcopy(self.optimizer.state_dict())
        finally:
            self._healing = False
        state: dict[str, Any] = {
            "slow_weights": self._slow.clone(),
            "step": self.step,
            "params": [p.detach().clone() for p in self.params],
            "buffers": [b.clone() for b in self.buffers],
            "optimizer": inner,
            "agreement": self._agreement,
        }
        if self._momentum is not None:
            state["momentum_buffer"] = self._momentum.clone()
        if self.user_state is not None:
            state["user"] = self.user_state[0]()
        return state

    @torch.no_grad()
    def _load_heal_state(self, state: dict[str, Any]) -> None:
        theirs, mine = state.get("agreement", {}), self._agreement
        differ = sorted(k for k in {*theirs, *mine} if theirs.get(k) != mine.get(k))
        if differ:
            raise ValueError(
                f"this replica group was given another config than the live groups: "
                f"{', '.join(differ)} differ (start it with the same config and overrides)"
            )
        if self.user_state is not None:
            self.user_state[1](state["user"])
        self._load_outer(state)
        for p, value in zip(self.params, state["params"], strict=True):
            p.copy_(value)
        for b, value in zip(self.buffers, state.get("buffers", []), strict=True):
            b.copy_(value)
        self._healing = True
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        finally:
            self._healing = False
        if self._residual is not None:
            # what this group's earlier payloads lost was measured against slow weights it no
            # longer holds
            self._residual.zero_()
        self.stats["healed"] += 1
        log.info("healed from a peer: step %d", self.step)

    @torch.no_grad()
    def _load_outer(self, state: dict[str, Any]) -> None:
        slow = state["slow_weights"]
        if slow.shape != self._slow.shape:
            raise ValueError(
                f"slow weights of shape {tuple(slow.shape)} (from a peer or a checkpoint); this "
                f"group has {tuple(self._slow.shape)}: not the same model"
            )
        if self._momentum is not None and "momentum_buffer" not in state:
            raise ValueError("the outer state has no outer momentum buffer, but outer_momentum > 0")
        self._slow.copy_(slow)
        if self._momentum is not None:
            self._momentum.copy_(state["momentum_buffer"])
        self.step = int(state["step"])

    def _state_dict_hook(self, optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        if not self._healing:
            state["outer"] = self.state_dict()
        return state

    def _load_state_dict_hook(self, optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        if self._healing:
            return state
        state, outer = split_outer_state(optimizer, state, "a FaultTolerantSync")
        self.load_state_dict(outer)
        return state

    # ------------------------------------------------------------------ internals
    def _world_size(self) -> int:
        """Replica groups in this sync's process group (those healing included)."""
        if self.process_group is not None:
            with contextlib.suppress(Exception):  # not configured yet
                return int(self.process_group.size())
        return max(int(self.manager.num_participants()), 1)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The work buffer ``name`` (made again when the shape changes: groups came or went)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape:
            buffer = torch.zeros(shape, dtype=dtype, device=self._slow.device)
            self._buffers[name] = buffer
        return buffer

    def _due(self, step: int) -> bool:
        return step <= self.options.sync_every_warmup_steps or step % self.options.sync_every == 0

    @torch.no_grad()
    def _launch(self, overlapped: bool) -> None:
        """Start a sync: the quorum (blocking: a group behind heals here), then the exchange
        of the weights (or the encoded pseudo-gradients), left in flight. ``overlapped``: keep
        what the merge needs to carry the steps trained meanwhile (with ``eager``, the outer
        step with this group's own weights as the mean, applied now)."""
        start = time.perf_counter()
        self.manager.start_quorum()  # may heal: load a peer's state through _load_heal_state
        # what travels beside the weights: [averaged buffers | config digests]
        nb = self._buffer_numel
        side = torch.empty(
            nb + (0 if self._digests is None else self._digests.numel()),
            dtype=self._slow.dtype,
            device=self._slow.device,
        )
        if nb:
            torch.cat([b.reshape(-1).to(side.dtype) for b in self._averaged], out=side[:nb])
        if self._digests is not None:
            side[nb:] = self._digests
        size = self._world_size()
        if self._codec is None:  # one all-reduce: [parameters (this process's chunk) | side]
            n = self.span
            flat = self._buffer("flat", (n + side.numel(),), self._slow.dtype)
            side = self._own_weights(flat[:n], side)
            flat[n:] = side
            work = self.manager.allreduce(flat)
            sent = ring_bytes(flat.numel(), flat.element_size(), size)
        else:  # one all-gather: [header | side | this group's encoded pseudo-gradient]
            work, sent, side = self._launch_compressed(side, size)
        pending = _InFlight(
            work=work,
            launched_at=self.step,  # after the quorum: a heal sets the step
            warm=self.step <= self.options.sync_every_warmup_steps,
            side=side,
            sent=sent,
            participating=bool(self.manager.is_participating()),
        )
        if overlapped:
            pending.snapshot = self._flatten()  # (shard_slow, which needs the whole, is blocking)
            if self.options.eager:
                estimate = self._slow.clone()
                momentum = None if self._momentum is None else self._momentum.clone()
                compressed = self._codec is not None
                own = pending.snapshot.sub(self._slow) if compressed else pending.snapshot.clone()
                outer_step(
                    estimate, own, self.options, momentum, is_delta=compressed, warm=pending.warm
                )
                pending.estimate = estimate
                self._set_params(estimate)
        self._pending = pending
        self.stats["time_s"] += time.perf_counter() - start

    @torch.no_grad()
    def _decide(self) -> _InFlight:
        """Wait for the sync in flight and ask the manager whether to commit it (once: a
        checkpoint taken while it is in flight decides it early, and keeps the decision)."""
        pending = self._pending
        assert pending is not None
        if pending.decided:
            return pending
        start = time.perf_counter()
        nb = self._buffer_numel
        target: Tensor | None
        if self._codec is None:
            assert pending.work is not None
            pending.work.wait()
            flat = self._buffers["flat"]
            target, side_mean = flat[: self.span], flat[self.span :]
        else:
            target, side_mean = self._finish_compressed(pending)
        pending.work = None
        # every process of this group votes; all commit or none do
        committed = bool(self.manager.should_commit()) and target is not None
        if committed and self.local_size > 1 and not self.options.shard_slow:
            assert target is not None  # the whole mean: each process holds one chunk of it
            target = self._gather_chunks(target)
        if committed and self._digests is not None:
            # only a completed exchange holds the mean digests: one a group died in holds
            # partial sums, which must not read as another config
            self._check_agreement(side_mean[nb:])
        pending.decided, pending.committed = True, committed
        if committed:
            assert target is not None
            pending.target, pending.side_mean = target, side_mean
            if self._residual is not None and pending.participating:
                # what this group's payload lost (sent + kept == its pseudo-gradient)
                kept = self._buffers["kept"].view(-1)
                pending.residual = self._buffers["delta"].view(-1).sub(kept)
        self.stats["time_s"] += time.perf_counter() - start
        return pending

    @torch.no_grad()
    def _merge(self) -> bool:
        """Apply the sync in flight if committed; whether it was. Committed: the outer step, and
        the parameters move with the slow weights, keeping the steps trained since the launch.
        Discarded: the slow weights stay, and an eager estimate is taken back (the steps
        trained since stay, as from the parameters at the launch)."""
        pending = self._decide()
        self._pending = None
        moved = self.step != pending.launched_at
        if pending.committed:
            assert pending.target is not None and pending.side_mean is not None
            outer_step(
                self._slow,
                pending.target,
                self.options,
                self._momentum,
                is_delta=self._codec is not None,
                warm=pending.warm,
            )
            if pending.residual is not None and self._residual is not None:
                self._residual.copy_(pending.residual)
            slow = self._full_slow()
            if not moved:  # nothing trained since the launch: exactly the slow weights
                self._set_params(slow)
            else:  # trained on from the estimate (eager) or the launch's weights
                base = pending.estimate if pending.estimate is not None else pending.snapshot
                assert base is not None
                self._set_params(self._flatten().add_(slow.sub(base)))
            offset = 0
            for b in self._averaged:
                b.copy_(pending.side_mean[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            self.stats["syncs"] += 1
            self.stats["bytes"] += pending.sent
        else:
            if pending.estimate is not None:  # take the eager step back
                assert pending.snapshot is not None
                if moved:
                    self._set_params(self._flatten().add_(pending.snapshot.sub(pending.estimate)))
                else:
                    self._set_params(pending.snapshot)
            self.stats["discarded"] += 1
            log.warning(
                "sync at step %d discarded (a replica group failed during it, or too few took "
                "part); the slow weights are unchanged and the next sync includes these steps",
                pending.launched_at,
            )
        return pending.committed

    def _launch_compressed(self, side: Tensor, size: int) -> tuple[Any, int, Tensor]:
        """Encode this group's row and start its all-gather: the wrapped future (``None`` when
        the manager had already failed, or the start did), the bytes handed to it and ``side``
        as sent (a group of several processes sends their mean).

        Each of the ``size`` groups sends one row of bytes: ``HEADER`` (byte 0: 1 when it takes
        part, 0 when it is healing), ``side`` as fp32 (padded to 16 bytes), then its encoded
        pseudo-gradient (:meth:`_finish_compressed` decodes them)."""
        from torch.distributed.distributed_c10d import AllgatherOptions

        codec, n = self._codec, self.span
        assert codec is not None and self.process_group is not None
        delta = self._buffer("delta", (1, n), torch.float32)
        side = self._own_weights(delta.view(-1), side)
        t0 = time.perf_counter()
        delta.view(-1).sub_(self._slow[self._chunk])
        if self._residual is not None:
            delta.view(-1).add_(self._residual)
        at = HEADER + -(-4 * side.numel() // 16) * 16  # where the payload starts
        row = self._buffer("row", (at + codec.nbytes(n),), torch.uint8)
        kept = self._buffer("kept", (1, n), torch.float32) if self._residual is not None else None
        codec.encode(delta, out=row[at:].view(1, -1), dequantized=kept)
        row[0] = 1 if self.manager.is_participating() else 0
        row[HEADER : HEADER + 4 * side.numel()] = side.float().view(torch.uint8)
        gathered = self._buffer("gathered", (size, row.numel()), torch.uint8)
        self.stats["codec_s"] += time.perf_counter() - t0
        future = None
        if self.manager.errored() is None:
            try:
                work = self.process_group.allgather(
                    [list(gathered.unbind(0))], [row], AllgatherOptions()
                )
                future = self.manager.wrap_future(work.get_future(), None)
            except Exception as e:  # a peer died: discard this sync everywhere
                self.manager.report_error(e)
        return future, (size - 1) * row.numel(), side

    def _finish_compressed(self, pending: _InFlight) -> tuple[Tensor | None, Tensor]:
        """The mean pseudo-gradient ``(n,)`` fp32 and the mean of ``side`` over the groups
        taking part, from the gathered rows: every group decodes the rows marked 1 in rank
        order and sums them in fp32, so all get the same means, bit for bit. ``None`` for the
        mean when the exchange failed (the error is reported to the manager, so the sync is
        discarded)."""
        codec, side = self._codec, pending.side
        assert codec is not None
        if pending.work is not None:
            pending.work.wait()  # wrapped: a failure is reported to the manager, not raised
        if self.manager.errored() is not None:
            return None, side
        t0 = time.perf_counter()
        gathered = self._buffers["gathered"]
        taking = (gathered[:, 0] == 1).nonzero().view(-1)
        if taking.numel() != self.manager.num_participants():
            self.manager.report_error(
                RuntimeError(
                    f"{taking.numel()} groups marked their payload as taking part, the quorum "
                    f"has {self.manager.num_participants()}"
                )
            )
            return None, side
        rows = gathered[taking]
        count = taking.numel()
        side_mean = side
        if side.numel():
            sides = rows[:, HEADER : HEADER + 4 * side.numel()].flatten().view(torch.float32)
            side_mean = sides.view(count, -1).sum(dim=0).div_(count).to(side.dtype)
        at = HEADER + -(-4 * side.numel() // 16) * 16
        mean = codec.decode(rows[:, at:], self.span).sum(dim=0).div_(count)
        self.stats["codec_s"] += time.perf_counter() - t0
        return mean, side_mean

    def _views(self, flat: Tensor) -> Iterable[Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def _flatten(self, out: Tensor | None = None) -> Tensor:
        """The parameters, flat: into ``out`` (at least ``numel`` long), or a new ``(padded,)``
        tensor, zero after ``numel``."""
        if out is None:
            out = torch.zeros(self.padded, dtype=self.params[0].dtype, device=self.params[0].device)
        torch._foreach_copy_(list(self._views(out)), [p.detach() for p in self.params])
        return out

    def _own_weights(self, out: Tensor, side: Tensor) -> Tensor:
        """Write what this process sends to the other groups into ``out`` (``(span,)``): its
        parameters, or in a group of several processes the group's mean of its chunk of them
        (a reduce-scatter inside the group); returns ``side`` as sent: the group's mean."""
        if self.local_size == 1:
            self._flatten(out)
            return side
        # zero-padded; kept: the padding stays 0
        flat = self._flatten(self._buffer("own", (self.padded,), self._slow.dtype)).to(out.dtype)
        blocking(reduce_scatter_single, [out, flat], out, flat, group=self.local_group)
        out.div_(self.local_size)
        if side.numel():
            side = side.clone()
            blocking(dist.all_reduce, [side], side, group=self.local_group)
            side.div_(self.local_size)
        return side

    def _gather_chunks(self, chunk: Tensor) -> Tensor:
        """Every process's ``(span,)`` chunk of this group, in rank order: ``(padded,)``."""
        full = torch.empty(self.padded, dtype=chunk.dtype, device=chunk.device)
        blocking(all_gather_single, [full, chunk], full, chunk, group=self.local_group)
        return full

    def _full_slow(self) -> Tensor:
        """The slow weights ``(padded,)`` (with ``shard_slow``, gathered from the group's
        processes: a collective)."""
        if self.options.shard_slow and self.local_size > 1:
            return self._gather_chunks(self._slow)
        return self._slow

    def _set_params(self, flat: Tensor) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], list(self._views(flat)))

    def _check_agreement(self, mean: Tensor) -> None:
        """Raise naming the keys whose digest the groups' mean does not match (a group that
        heals sends zeros and is not counted, so only the groups taking part are compared)."""
        assert self._digests is not None
        differ = (mean != self._digests).tolist()
        keys = [key for key, bad in zip(self._agreement, differ, strict=True) if bad]
        if keys:
            raise ValueError(
                f"the replica groups were given different configs: {', '.join(keys)} differ "
                "(every group must get the same config; only replica_group, lighthouse and "
                "hostname are its own)"
            )


def _digests(values: Mapping[str, Any], device: torch.device) -> Tensor:
    """One number per key, in order: 20 bits of the SHA-256 of the value's ``repr`` (exact in
    fp32, and so is the mean of up to 16 equal ones)."""
    out = [
        int.from_bytes(hashlib.sha256(repr(v).encode()).digest()[:3], "little") >> 4
        for v in values.values()
    ]
    return torch.tensor(out, dtype=torch.float32, device=device)
