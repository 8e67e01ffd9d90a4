"""Process-level setup: device, threads, and the torch.distributed process group under torchrun."""

from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rangerdl.train.choices import BACKENDS

__all__ = ["BACKENDS", "Runtime", "init_runtime", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()  # no rank tears down while another still talks to it
            dist.destroy_process_group()


def init_runtime(device: str, backend: str, threads: int, timeout_s: float) -> Runtime:
    """Single process, or one rank of a ``torchrun`` job (``RANK``/``WORLD_SIZE`` set)."""
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
