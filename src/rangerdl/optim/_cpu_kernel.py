"""Build, cache and call ``_ranger_cpu.c``: Ranger's step in one pass for float32 CPU tensors.

The C file is compiled once per machine with the system C compiler (``$CC``, else ``cc``; about
half a second) into ``$RANGERDL_CACHE`` (default ``~/.cache/rangerdl``) and loaded through
ctypes, as torch.compile builds its CPU kernels. The first fused CPU step builds it and logs so
at INFO; later processes load the cached library. Without a working compiler :func:`load`
returns ``None`` after one warning, and Ranger uses torch's fused AdamW kernel instead (same
result, a second pass over the gradient for centralisation); so does ``RANGERDL_CPU_KERNEL=0``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["applies", "load", "step"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_ranger_cpu.c")
FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fopenmp",
    "-shared",
    "-fPIC",
]


class _Scalars(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_float)
        for name in ("sign", "decay", "w1", "beta2", "w2", "eps", "neg_ss", "alpha")
    ]


_data_ptr = Tensor.data_ptr
_layouts: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}

# Values per unit of work for tensors that are not centred (a multiple of any vector width).
UNCENTRED_CHUNK = 4096

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _cpu_id() -> str:
    """What ``-march=native`` depends on: a library built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120
        )
        os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; ``None`` if it cannot be built.

    Warns (once per process) when the compiler is missing or fails. ``RANGERDL_CPU_KERNEL=0``
    in the environment turns the kernel off (``None``, no warning).
    """
    if os.environ.get("RANGERDL_CPU_KERNEL") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    with _lock:
        if compiler in _loaded:
            return _loaded[compiler]
        lib = None
        path = shutil.which(compiler)
        if path is None:
            warnings.warn(
                f"Ranger: no C compiler ({compiler!r}) found; the fused CPU step falls back to "
                "torch's fused AdamW kernel plus a separate pass for gradient centralisation",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            key = hashlib.sha256(
                b"\0".join(
                    s.encode()
                    for s in (
                        SOURCE.read_text(),
                        " ".join(FLAGS),
                        path,
                        _cpu_id(),
                        torch.__version__,
                    )
                )
            ).hexdigest()[:16]
            cache = Path(os.environ.get("RANGERDL_CACHE", Path.home() / ".cache" / "rangerdl"))
            target = cache / f"ranger_cpu_{key}.so"
            try:
                if not target.exists():
                    start = time.perf_counter()
                    _build(path, target)
                    logger.info(
                        "Ranger: built the fused CPU kernel in %.1f s (once per machine): %s",
                        time.perf_counter() - start,
                        target,
                    )
                lib = ctypes.CDLL(str(target))
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
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", b"") or b""
                warnings.warn(
                    f"Ranger: building the fused CPU kernel with {path} failed ({e}; "
                    f"{detail.decode(errors='replace')[:500]}); falling back to torch's fused "
                    "AdamW kernel plus a separate pass for gradient centralisation",
                    RuntimeWarning,
                    stacklevel=3,
                )
                lib = None
        _loaded[compiler] = lib
        return lib


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
