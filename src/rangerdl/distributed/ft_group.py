"""A replica group's link to torchft: :func:`connect` (its ``Manager``) and :class:`PeerWatch`
(a group of several processes ends together).

:mod:`rangerdl.distributed.ft` has the outer sync that runs through them. torchft is an extra
(``pip install "rangerdl[ft]"``), imported only when :func:`connect` runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rangerdl._lock import pid_alive
from rangerdl.distributed.release import broadcast_object

__all__ = ["PeerWatch", "connect", "local_rank_and_size", "require_torchft"]

log = logging.getLogger(__name__)

INSTALL = (
    'torchft is not installed: pip install "rangerdl[ft]" (with your torch already installed; '
    "pip keeps it: torchft asks for torch >= 2.7)"
)


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
    local_group: Any = None,
) -> Any:
    """A torchft ``Manager`` for this process, in a replica group of one process, or (with
    ``local_group``) one rank of a replica group of several.

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
        local_group: the ``torch.distributed`` process group of this replica group's processes
            (its ``torchrun`` job; ``None``: one process). Its rank 0 serves the group's manager
            and store (at ``hostname``); every rank calls this.

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
    _quiet_torchft_logs(torch.device(device))
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
    rank, size = local_rank_and_size(local_group)
    store = TCPStore(host, 0, is_master=True, wait_for_workers=False) if rank == 0 else None
    where = (host, store.port) if store is not None else None
    if size > 1:  # the group's store, which its manager server is found through
        where = broadcast_object(where, src=dist.get_global_rank(local_group, 0), group=local_group)
    assert where is not None
    manager = Manager(
        pg=pg,
        load_state_dict=None,
        state_dict=None,
        min_replica_size=min_replicas,
        use_async_quorum=False,  # heal before the sync, not during the next steps
        timeout=timeout,
        quorum_timeout=timedelta(seconds=quorum_timeout_s),
        connect_timeout=timedelta(seconds=connect_timeout_s),
        rank=rank,
        world_size=size,
        store_addr=where[0],
        store_port=where[1],
        lighthouse_addr=address,
        replica_id=str(replica_group),
        hostname=host,
        checkpoint_transport=Transport(timeout=timeout, num_chunks=0),
        init_sync=False,  # every group builds the same weights from the same seed
    )
    manager.rangerdl_store = store  # the store must outlive the manager's clients
    manager.rangerdl_process_group = pg  # the compressed syncs' all-gather runs on it
    return manager


class PeerWatch:
    """Ends this process at once when another process of its replica group on this host has
    died (the group is lost: torchrun will end and restart it). A daemon thread looks every
    ``interval_s``; :meth:`close` stops it (before the processes may end normally).

    Made by every process of the group together (an all-gather of host names and pids)."""

    def __init__(self, local_group: Any, interval_s: float = 0.1) -> None:
        from rangerdl.distributed.release import all_gather_object

        me = (socket.gethostname(), os.getpid())
        everyone = all_gather_object(me, group=local_group)
        self.pids = [pid for host, pid in everyone if host == me[0] and pid != me[1]]
        self._interval_s = interval_s
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rangerdl-peer-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closed.wait(self._interval_s):
            gone = [pid for pid in self.pids if not _alive(pid)]
            if gone and not self._closed.is_set():
                log.error(
                    "process %d of this replica group has died: the group is lost (torchrun "
                    "restarts it, and it heals from a live group); ending this process now",
                    gone[0],
                )
                for handler in logging.getLogger().handlers:
                    with contextlib.suppress(Exception):
                        handler.flush()
                os._exit(1)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    if not pid_alive(pid):
        return False
    with contextlib.suppress(OSError, IndexError):
        # /proc/PID/stat: "PID (COMM) STATE ...", COMM may hold spaces and parentheses
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    return True


def local_rank_and_size(local_group: Any) -> tuple[int, int]:
    """This process's rank in its replica group and the group's size (``0, 1`` without one)."""
    if local_group is None:
        return 0, 1
    return dist.get_rank(local_group), dist.get_world_size(local_group)


class _NoFlightRecorder(logging.Filter):
    """Drops torchft's warning that it cannot reset NCCL's flight recorder (gloo has none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "flight recorder" not in record.getMessage()


def _quiet_torchft_logs(device: torch.device) -> None:
    """torchft logs every quorum and commit at INFO: keep its warnings, unless the caller set
    those loggers' levels; on CPU also drop the flight-recorder warning (NCCL only)."""
    for name in ("torchft", "torchft_quorums", "torchft_commits"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    if device.type != "cuda":
        manager_log = logging.getLogger("torchft.manager")
        if not any(isinstance(f, _NoFlightRecorder) for f in manager_log.filters):
            manager_log.addFilter(_NoFlightRecorder())


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
