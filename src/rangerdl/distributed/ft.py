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
   counted);
3. ``manager.should_commit()``: only when every group in the quorum finished the all-reduce do they
   apply the outer step (:func:`~rangerdl.distributed.sync.outer_step`) and continue from the new
   slow weights. A sync in which a member died is discarded by all: the slow weights stay as they
   were (never half-applied) and each group keeps its local progress, synced at the next one.

Healing sends the slow weights, the outer momentum, the step clock, the parameters, the inner
optimizer's ``state_dict()`` and whatever ``user_state`` returns (the data position): the state as
the sending peer had it at the start of that sync, which the healed group then syncs like the
others, so all end the sync with the same slow weights, bit for bit. Torchft's HTTP transport
carries it; this module reads it with torch's ``weights_only`` unpickler (tensors and plain types
only: nothing a peer sends can run code). A peer is otherwise trusted as in ``torch.distributed``:
run the Lighthouse and the groups on a private network.

A group that starts fresh trains from its own initial weights until its first sync, then takes
the others' state: start every group from the same seed (identical weights) and the only cost is
up to ``sync_every`` steps of its own. One process per replica group here; a group's state is its
one process's.

References: torchft (github.com/pytorch/torchft, ``torchft.local_sgd.DiLoCo`` and ``Manager``);
DiLoCo, Douillard et al. 2023 (arXiv 2311.08105); Lookahead, Zhang et al. 2019.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from rangerdl.distributed.cost import ring_bytes
from rangerdl.distributed.options import SyncOptions
from rangerdl.distributed.sync import inner_options, outer_step

__all__ = ["FaultTolerantSync", "connect", "require_torchft"]

log = logging.getLogger(__name__)

INSTALL = (
    'torchft is not installed: pip install "rangerdl[ft]" (with your torch already installed; '
    "pip keeps it: torchft asks for torch >= 2.7)"
)
UNSUPPORTED = ("overlap", "shard_slow", "compression", "comm_dtype")


def require_torchft() -> Any:
    """The ``torchft`` module; ``ImportError`` naming the extra to install when it is missing."""
    try:
        import torchft
    except ImportError as exc:
        raise ImportError(INSTALL) from exc
    return torchft


def connect(
    lighthouse: str,
    replica_group: int | str,
    *,
    min_replicas: int = 1,
    hostname: str | None = None,
    timeout_s: float = 60.0,
    quorum_timeout_s: float = 600.0,
    connect_timeout_s: float = 10.0,
    device: torch.device | str = "cpu",
) -> Any:
    """A torchft ``Manager`` for this process as a replica group of one process.

    Args:
        lighthouse: the Lighthouse's address, ``HOST:PORT`` or ``http://HOST:PORT`` (``rangerdl
            lighthouse`` prints it).
        replica_group: this group's name (or index): a restarted group reuses its name.
        min_replicas: the fewest groups a sync may commit with.
        hostname: the address the other groups reach this one at (its store, its manager, its
            healing server); default: this machine's host name.
        timeout_s: collectives, commit and healing transfers (seconds).
        quorum_timeout_s: how long a sync waits for its quorum (the slowest group's
            ``sync_every`` steps must fit in it).
        connect_timeout_s: how long to try to reach the Lighthouse before giving up.
        device: ``cpu`` (gloo) or a CUDA device (NCCL).

    Raises:
        ImportError: torchft missing (with the install line).
        ConnectionError: the Lighthouse did not answer within ``connect_timeout_s``, naming its
            address.
    """
    require_torchft()
    from torch.distributed import TCPStore
    from torchft.checkpointing.http_transport import HTTPTransport
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

    address = lighthouse if "://" in lighthouse else f"http://{lighthouse}"
    host = hostname or socket.gethostname()
    timeout = timedelta(seconds=timeout_s)
    _wait_for(address, connect_timeout_s)

    class Transport(HTTPTransport):
        """Advertises ``host`` (not the host name, which a network namespace may resolve to its
        own loopback) and loads what a peer sends as tensors and plain types only."""

        def address(self) -> str:
            return f"http://{host}:{self._server.socket.getsockname()[1]}/checkpoint/"

        @classmethod
        def _load_from_address(cls, url: str, timeout: timedelta) -> object:
            import urllib.request
            import warnings

            from torch.distributed._serialization import _streaming_load

            with (
                urllib.request.urlopen(url, timeout=timeout.total_seconds()) as f,
                warnings.catch_warnings(),
            ):
                # torch reads the tensors from the received bytes, which it calls not writable
                warnings.filterwarnings("ignore", "The given buffer is not writable")
                return _streaming_load(f, weights_only=True)

    dev = torch.device(device)
    pg = ProcessGroupNCCL(timeout=timeout) if dev.type == "cuda" else ProcessGroupGloo(timeout)
    store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=pg,
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replicas,
        use_async_quorum=False,  # heal before the sync, not during the next steps
        timeout=timeout,
        quorum_timeout=timedelta(seconds=quorum_timeout_s),
        connect_timeout=timedelta(seconds=connect_timeout_s),
        rank=0,
        world_size=1,
        store_addr=host,
        store_port=store.port,
        lighthouse_addr=address,
        replica_id=str(replica_group),
        hostname=host,
        checkpoint_transport=Transport(timeout=timeout, num_chunks=0),
        init_sync=False,  # every group builds the same weights from the same seed
    )
    manager.rangerdl_store = store  # the store must outlive the manager's clients
    return manager


def _wait_for(address: str, timeout_s: float) -> None:
    """Wait until the Lighthouse at ``address`` (``http://HOST:PORT``) accepts connections;
    ``ConnectionError`` naming it after ``timeout_s``."""
    host, _, port = address.split("://", 1)[1].rstrip("/").rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no torchft Lighthouse answered at {address} within {timeout_s:g} s ({exc}); "
                    "start one with `rangerdl lighthouse --bind HOST:PORT` (or check the address)"
                ) from None
            time.sleep(0.2)


class FaultTolerantSync:
    """Synchronises the parameters of ``optimizer`` across torchft replica groups every
    ``options.sync_every`` calls of ``optimizer.step()``, keeping the slow weights (the module
    docstring has the protocol).

    Args:
        optimizer: the inner optimizer (``Ranger(lookahead=False)``, AdamW, ...): its parameters
            share one dtype and device.
        manager: from :func:`connect`. This object registers its state with it for healing.
        options: ``sync_every``, ``outer_lr``, ``outer_momentum``, ``nesterov``,
            ``sync_every_warmup_steps`` as in :class:`OuterSync` (``0``: the optimizer's ``k``
            and ``alpha``). ``overlap``, ``shard_slow`` and ``compression`` are not available on
            torchft here: an error names the option.
        user_state: ``(state_dict, load_state_dict)`` callables for what else a healed group
            needs, e.g. the data position; their value must be tensors and plain types.

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
    ) -> None:
        require_torchft()
        given, defaults = options or SyncOptions(), SyncOptions()
        for name in UNSUPPORTED:
            if getattr(given, name) != getattr(defaults, name):
                raise ValueError(
                    f"{name} = {getattr(given, name)!r} is not available with torchft (its "
                    "syncs are blocking fp32 all-reduces of the weights here); leave it at "
                    f"{getattr(defaults, name)!r}"
                )
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
        self.step = 0
        self._slow = self._flatten()
        self._momentum = torch.zeros_like(self._slow) if self.options.outer_momentum > 0 else None
        self._user_state = user_state
        self.stats = {"syncs": 0, "discarded": 0, "healed": 0, "bytes": 0, "time_s": 0.0}
        manager.register_state_dict_fn("rangerdl", self._load_heal_state, self._heal_state)
        self._hook = optimizer.register_step_post_hook(lambda *_: self.after_step())

    # ------------------------------------------------------------------ public
    def after_step(self) -> None:
        """Count one optimizer step and sync when due (the optimizer's step post-hook calls it)."""
        self.step += 1
        if self.step <= self.options.sync_every_warmup_steps or (
            self.step % self.options.sync_every == 0
        ):
            self.sync()

    @torch.no_grad()
    def sync(self) -> bool:
        """One sync now (normally called every ``sync_every`` steps); whether it was committed.
        A discarded sync changes nothing here but the counters."""
        start = time.perf_counter()
        self.manager.start_quorum()  # may heal: load a peer's state through _load_heal_state
        mean = self._flatten()
        participants = max(self.manager.num_participants(), 1)
        self.manager.allreduce(mean).wait()
        committed = bool(self.manager.should_commit())
        if committed:
            warm = self.step <= self.options.sync_every_warmup_steps
            outer_step(self._slow, mean, self.options, self._momentum, warm=warm)
            self._set_params(self._slow)
            self.stats["syncs"] += 1
            self.stats["bytes"] += ring_bytes(self.numel, mean.element_size(), participants)
        else:
            self.stats["discarded"] += 1
            log.warning(
                "sync at step %d discarded (a replica group failed during it, or too few took "
                "part); the slow weights are unchanged and the next sync includes these steps",
                self.step,
            )
        self.stats["time_s"] += time.perf_counter() - start
        return committed

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)`` for every parameter: the model worth evaluating."""
        return list(zip(self.params, self._views(self._slow), strict=True))

    def close(self) -> None:
        """Detach from the optimizer (the manager is the caller's to shut down)."""
        self._hook.remove()

    def comm_stats(self) -> dict[str, float]:
        """``comm/syncs`` (committed), ``comm/discarded``, ``comm/healed``, ``comm/bytes``
        (sent by this group), ``comm/time_s`` (blocked in syncs, quorum included)."""
        return {f"comm/{k}": float(v) for k, v in self.stats.items()}

    # ------------------------------------------------------------------ healing
    def _heal_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "slow_weights": self._slow.clone(),
            "step": self.step,
            "params": [p.detach().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
        }
        if self._momentum is not None:
            state["momentum_buffer"] = self._momentum.clone()
        if self._user_state is not None:
            state["user"] = self._user_state[0]()
        return state

    @torch.no_grad()
    def _load_heal_state(self, state: dict[str, Any]) -> None:
        slow = state["slow_weights"]
        if slow.shape != self._slow.shape:
            raise ValueError(
                f"a peer sent slow weights of shape {tuple(slow.shape)}; this group has "
                f"{tuple(self._slow.shape)}: the replica groups train different models"
            )
        self._slow.copy_(slow)
        if self._momentum is not None:
            self._momentum.copy_(state["momentum_buffer"])
        for p, value in zip(self.params, state["params"], strict=True):
            p.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self._user_state is not None:
            self._user_state[1](state["user"])
        self.stats["healed"] += 1
        log.info("healed from a peer: step %d", self.step)

    # ------------------------------------------------------------------ internals
    def _views(self, flat: Tensor) -> Iterable[Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def _flatten(self) -> Tensor:
        out = torch.empty(self.numel, dtype=self.params[0].dtype, device=self.params[0].device)
        torch._foreach_copy_(list(self._views(out)), [p.detach() for p in self.params])
        return out

    def _set_params(self, flat: Tensor) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], list(self._views(flat)))
