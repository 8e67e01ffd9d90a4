"""Collectives whose tensors are free again when they return.

A gloo process group runs each collective on one of its worker threads, which drops its
reference to the work, and with it to the work's tensors, a moment *after* waking the caller.
When the caller has dropped its own Python reference by then, the worker thread is the last owner
of a tensor that still carries its Python object, and must take the GIL to free it. If the
interpreter has started shutting down meanwhile (the collective was the last thing a rank did),
CPython ends that thread with ``pthread_exit`` inside a C++ destructor, and the process aborts with
``terminate called without an active exception`` (SIGABRT) although its work was done. torchrun
then reports the whole job as failed.

:func:`hold` and :func:`settle` close that window. torch releases a tensor's Python object
(which needs the GIL) when the tensor's C++ references drop from two (the Python object's own and
one more) to one. So the caller holds one more C++ reference for the length of the collective (a
view, which keeps its base from C++): the worker thread's release is then an ordinary decrement.
:func:`settle` waits until the worker has let go (each tensor's reference count is back where it
was before the collective), and the caller drops its hold on its own thread. It costs a few
microseconds per collective: the worker lets go right after waking the caller. NCCL keeps its own
references until its watchdog collects the work, so only CPU (gloo) tensors are waited for.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "RELEASE_TIMEOUT_S",
    "all_gather_object",
    "blocking",
    "broadcast_object",
    "hold",
    "reduce_scatter_single",
    "settle",
    "use_counts",
]

RELEASE_TIMEOUT_S = 30.0
"""How long :func:`settle` waits for a worker thread to let go before keeping the tensors alive
for the rest of the process instead (they can then never be freed off the main thread)."""

_kept: list[Any] = []  # holds on tensors a worker thread did not let go of in time


all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""``torch.distributed.all_gather_single`` (newer torch, where ``all_gather_into_tensor``
warns that it is deprecated), else ``all_gather_into_tensor``: the same collective."""

reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
"""``torch.distributed.reduce_scatter_single`` (newer torch, where ``reduce_scatter_tensor``
warns that it is deprecated), else ``reduce_scatter_tensor``: the same collective."""


def hold(tensors: Sequence[Tensor]) -> Any:
    """One more C++ reference to each tensor, until the returned object is dropped: a view of
    each, which keeps its base alive from C++."""
    return [t.view(t.shape) for t in tensors]


def use_counts(tensors: Sequence[Tensor]) -> list[int]:
    """The C++ reference count of each tensor (``-1`` where torch cannot tell)."""
    return [_use_count(t) for t in tensors]


def settle(
    tensors: Sequence[Tensor],
    baseline: Sequence[int],
    holder: Any = None,
    timeout_s: float = RELEASE_TIMEOUT_S,
) -> None:
    """Return once no process-group thread holds a reference to ``tensors`` any more: each
    tensor's reference count is back to its ``baseline`` (taken with :func:`use_counts` before the
    collective, with ``holder`` from :func:`hold` in place), or the tensor is not a CPU tensor.
    Call it after the collective completed and after the caller dropped its work handle; drop
    ``holder`` after it. After ``timeout_s`` the hold is kept for the life of the process (a
    debug log line says so): a late release then needs no GIL."""
    waiting = [
        (t, b) for t, b in zip(tensors, baseline, strict=True) if t.device.type == "cpu" and b >= 0
    ]
    delay, deadline = 1e-5, time.monotonic() + timeout_s
    while waiting:
        waiting = [(t, b) for t, b in waiting if _use_count(t) > b]
        if not waiting:
            return
        if time.monotonic() > deadline:
            log.debug("a collective's worker thread still holds %d tensors", len(waiting))
            _kept.append(holder if holder is not None else [t for t, _ in waiting])
            return
        time.sleep(delay)  # releases the GIL, which the worker may need
        delay = min(delay * 2, 1e-3)


def blocking(fn: Callable[..., Any], tensors: Sequence[Tensor], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a blocking ``torch.distributed`` collective on ``tensors``,
    followed by :func:`settle`."""
    holder = hold(tensors)
    baseline = use_counts(tensors)
    out = fn(*args, **kwargs)
    settle(tensors, baseline, holder)
    del holder  # now the last C++ reference but the Python object's, on this thread
    return out


def _object_device(group: Any) -> torch.device:
    """Where the bytes of an object collective live: the current CUDA device for NCCL, else the
    CPU (as ``torch.distributed``'s own object collectives choose)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` in rank order, as ``torch.distributed.all_gather_object`` (pickled,
    so only between the ranks of one job), but through collectives that settle: the byte
    tensors are free when it returns, so a rank may raise and exit right after it (a refused
    configuration) without the abort described above. ``torch.distributed``'s own object
    collectives leave their tensors to the gloo thread, and a ``barrier`` keeps them until it
    ends."""
    device = _object_device(group)
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    world = dist.get_world_size(group)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    blocking(all_gather_single, [sizes, size], sizes, size, group=group)
    longest = int(sizes.max())
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: data.numel()] = data
    everyone = torch.empty(world * longest, dtype=torch.uint8, device=device)
    blocking(all_gather_single, [everyone, mine], everyone, mine, group=group)
    raw = everyone.cpu().numpy().tobytes()
    return [pickle.loads(raw[r * longest : r * longest + n]) for r, n in enumerate(sizes.tolist())]


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Rank ``src``'s ``obj`` (a global rank) on every rank, as
    ``torch.distributed.broadcast_object_list`` with one object, through collectives that settle
    (see :func:`all_gather_object`)."""
    device = _object_device(group)
    sender = dist.get_rank() == src
    data = pickle.dumps(obj) if sender else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    blocking(dist.broadcast, [size], size, src=src, group=group)
    if sender:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size), dtype=torch.uint8, device=device)
    blocking(dist.broadcast, [buf], buf, src=src, group=group)
    return obj if sender else pickle.loads(buf.cpu().numpy().tobytes())


def _use_count(t: Tensor) -> int:
    count = getattr(t, "_use_count", None)
    return int(count()) if count is not None else -1
