"""Process-level setup: device, threads, and the torch.distributed process group under torchrun."""

from __future__ import annotations

import datetime
import logging
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from rangerdl.train.choices import BACKENDS

__all__ = [
    "BACKENDS",
    "Runtime",
    "default_threads",
    "init_runtime",
    "peer_error",
    "physical_cores",
    "raise_peer_error",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    replica_group: int | None = None
    """``[distributed] backend = "torchft"``: this process's replica group. ``rank`` and
    ``world_size`` are then within the group (its ``torchrun`` job, or one process): the group's
    run folder, checkpoints and evaluation are its own."""
    replica_groups: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """``(index, count)`` of this process's share of each global batch: its rank among the
        ranks, or (torchft) rank ``r`` of replica group ``i`` of ``n`` groups of ``world_size``
        processes each: ``(i * world_size + r, n * world_size)``."""
        if self.replica_group is not None:
            return (
                self.replica_group * self.world_size + self.rank,
                self.replica_groups * self.world_size,
            )
        return self.rank, self.world_size

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        from rangerdl.distributed.release import broadcast_object

        return broadcast_object(obj, src=0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        from rangerdl.distributed.release import all_gather_object

        return all_gather_object(obj)

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        from rangerdl.distributed.release import blocking

        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        blocking(dist.all_reduce, [t], t)
        return t.tolist()

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()  # no rank tears down while another still talks to it
            dist.destroy_process_group()


def peer_error(exc: BaseException) -> tuple[bool, str]:
    """``exc`` as another rank can receive it (plain types): whether a file was missing, and
    the message; :func:`raise_peer_error` raises it there."""
    return isinstance(exc, FileNotFoundError), str(exc)


def raise_peer_error(error: tuple[bool, str], what: str) -> NoReturn:
    """Raise a :func:`peer_error` on this rank, prefixed with ``what`` (which rank, doing what)."""
    missing, message = error
    raise (FileNotFoundError if missing else ValueError)(f"{what}: {message}")


def default_threads(cores: int, local_world_size: int, env: Mapping[str, str]) -> int | None:
    """Intra-op threads per process for ``[train] threads = 0``; ``None``: leave torch's own
    setting, because ``OMP_NUM_THREADS`` is set (torch reads it; torchrun sets it to 1 for several
    processes per node).

    One process per node: one thread per physical core (hyperthreads only contend for the same
    units). Several: 1 each, as torchrun does, so that processes do not thrash each other's cores.
    """
    if env.get("OMP_NUM_THREADS"):
        return None
    if local_world_size > 1:
        return 1
    return max(1, cores)


def physical_cores() -> int:
    """Physical cores this process may use: the CPUs in its affinity mask, less hyperthread
    siblings, capped by a cgroup CPU quota (containers)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = logical or 1
    try:
        info = Path("/proc/cpuinfo").read_text()
        siblings = int(info.split("siblings")[1].split(":")[1].split()[0])
        per_package = int(info.split("cpu cores")[1].split(":")[1].split()[0])
        cores = max(1, cores * per_package // max(siblings, 1))
    except (OSError, IndexError, ValueError):
        pass
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def init_runtime(
    device: str,
    backend: str,
    threads: int,
    timeout_s: float,
    replica_group: tuple[int, int] | None = None,
) -> Runtime:
    """Single process, or one rank of a ``torchrun`` job (``RANK``/``WORLD_SIZE`` set), or
    (``backend = "torchft"``) replica group ``replica_group = (i, n)``: one process, or a
    ``torchrun`` job (its process group then joins the group's processes: gloo on CPU, NCCL on
    CUDA). ``threads = 0``: :func:`default_threads`.

    Raises:
        ValueError: CUDA asked for but missing; NCCL on CPU.
    """
    if threads <= 0:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = default_threads(physical_cores(), local_world_size, os.environ) or 0
    if threads > 0:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("[train] device = 'cuda' but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if backend == "torchft":
        assert replica_group is not None, "torchft needs the replica group"
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            return Runtime(0, 1, 0, dev, None, *replica_group)
        local = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(local, timeout=datetime.timedelta(seconds=timeout_s))
        rank, size = dist.get_rank(), dist.get_world_size()
        return Runtime(rank, size, local_rank, dev, local, *replica_group)
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return Runtime(0, 1, 0, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("[distributed] backend = 'nccl' needs CUDA devices; use gloo on CPU")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if (
        dist.get_rank() == 0
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"
    ):
        log.warning(
            "torchrun --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, or a "
            "restarted job may read the last attempt's addresses and fail to connect "
            "(pytorch/pytorch#135712)"
        )
    return Runtime(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain types (loadable with weights_only=True)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return obj
