"""Call ``_ranger_cpu.c``: Ranger's step in one pass for float32 CPU tensors.

The C file is built once per machine by :mod:`rangerdl._native` (the system C compiler, cached
in ``$RANGERDL_CACHE``). The first fused CPU step builds it and logs so at INFO; later processes
load the cached library. Without a working compiler :func:`load` returns ``None`` after one
warning, and Ranger uses torch's fused AdamW kernel instead (same result, a second pass over
the gradient for centralisation); so does ``RANGERDL_CPU_KERNEL=0``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rangerdl._native import load_library

__all__ = ["applies", "load", "step"]

SOURCE = Path(__file__).with_name("_ranger_cpu.c")


class _Scalars(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_float)
        for name in ("sign", "decay", "w1", "beta2", "w2", "eps", "neg_ss", "alpha")
    ]


_data_ptr = Tensor.data_ptr
_layouts: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}

# Values per unit of work for tensors that are not centred (a multiple of any vector width).
UNCENTRED_CHUNK = 4096


def _declare(lib: ctypes.CDLL) -> None:
    lib.ranger_step.argtypes = [
        *[ctypes.POINTER(ctypes.c_void_p)] * 5,  # p, g, m, v, slow
        ctypes.POINTER(ctypes.c_int64),  # numel
        ctypes.POINTER(ctypes.c_int64),  # values per row
        ctypes.POINTER(ctypes.c_uint8),  # centre
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.POINTER(_Scalars),
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.ranger_step.restype = None


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; ``None`` if it cannot be built.

    Warns (once per process) when the compiler is missing or fails. ``RANGERDL_CPU_KERNEL=0``
    in the environment turns the kernel off (``None``, no warning).
    """
    return load_library(
        SOURCE,
        _declare,
        what="Ranger",
        fallback="the fused CPU step falls back to torch's fused AdamW kernel plus a separate "
        "pass for gradient centralisation",
    )


def applies(device: torch.device, dtype: torch.dtype, tensors: list[Tensor]) -> bool:
    """The kernel handles contiguous float32 CPU tensors only (``tensors`` all on ``device``,
    of ``dtype``)."""
    return (
        device.type == "cpu" and dtype == torch.float32 and all(map(Tensor.is_contiguous, tensors))
    )


def _layout(
    grads: list[Tensor], centre_min_dim: int | None, centralisable: Callable[[Tensor, int], bool]
) -> tuple[Any, Any, Any]:
    """The kernel's per-tensor sizes: values, values per row and the centring flag, as C arrays.
    They depend on the shapes only, so they are kept per list of shapes (a few per optimizer:
    one per bucket) instead of being rebuilt in Python at every step."""
    key = (centre_min_dim, *map(Tensor.size, grads))
    layout = _layouts.get(key)
    if layout is None:
        n = len(grads)
        numel = [g.numel() for g in grads]
        centre = [centre_min_dim is not None and centralisable(g, centre_min_dim) for g in grads]
        # A centred tensor is split at its rows; any other into chunks the threads share.
        cols = [
            v // g.shape[0] if c and v else UNCENTRED_CHUNK
            for g, v, c in zip(grads, numel, centre, strict=True)
        ]
        layout = ((ctypes.c_int64 * n)(*numel), (ctypes.c_int64 * n)(*cols),
                  (ctypes.c_uint8 * n)(*centre))  # fmt: skip
        if len(_layouts) >= 256:  # shapes that keep changing: start over
            _layouts.clear()
        _layouts[key] = layout
    return layout


def step(
    lib: ctypes.CDLL,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    slow: list[Tensor] | None,
    *,
    centre_min_dim: int | None,
    centralisable: Callable[[Tensor, int], bool],
    maximize: bool,
    decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    rectified: bool,
    alpha: float,
) -> None:
    """One in-place step over every tensor (see ``_ranger_cpu.c``); ``slow`` given on a Lookahead
    step. A gradient is centred where ``centralisable(g, centre_min_dim)`` (``centre_min_dim``
    None: none is). ``decay`` is ``1 - lr * weight_decay``; ``step_size`` multiplies
    ``m / (sqrt(v) + eps)`` when ``rectified``, else ``m``."""
    n = len(params)
    pointers = ctypes.c_void_p * n
    numel, cols, centre = _layout(grads, centre_min_dim, centralisable)
    scalars = _Scalars(-1.0 if maximize else 1.0, decay, 1 - beta1, beta2, 1 - beta2, eps,
                       -step_size, alpha)  # fmt: skip
    lib.ranger_step(
        pointers(*map(_data_ptr, params)),
        pointers(*map(_data_ptr, grads)),
        pointers(*map(_data_ptr, exp_avgs)),
        pointers(*map(_data_ptr, exp_avg_sqs)),
        pointers(*map(_data_ptr, slow)) if slow is not None else pointers(),
        numel,
        cols,
        centre,
        n,
        torch.get_num_threads(),
        ctypes.byref(scalars),
        int(rectified),
        int(slow is not None),
        int(decay != 1.0),
    )
