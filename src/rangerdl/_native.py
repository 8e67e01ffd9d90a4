"""Build, cache and load rangerdl's C kernels (one C file each) through ctypes.

A C file is compiled once per machine with the system C compiler (``$CC``, else ``cc``; about
half a second) into ``$RANGERDL_CACHE`` (default ``~/.cache/rangerdl``), keyed by its text, the
flags, the compiler, the CPU's features and torch's version, and loaded through ctypes, as
torch.compile builds its CPU kernels. Later processes load the cached library. Without a
working compiler :func:`load_library` returns ``None`` after one warning, and the caller takes
its torch path; so does ``RANGERDL_CPU_KERNEL=0`` (no warning).
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

import torch

__all__ = ["FLAGS", "load_library"]

logger = logging.getLogger(__name__)

FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fopenmp",
    "-shared",
    "-fPIC",
]

_lock = threading.Lock()
_loaded: dict[tuple[str, str], ctypes.CDLL | None] = {}


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


def _build(compiler: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(source), "-o", tmp], check=True, capture_output=True, timeout=120
        )
        os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(
    source: Path, declare: Callable[[ctypes.CDLL], None], *, what: str, fallback: str
) -> ctypes.CDLL | None:
    """The library compiled from ``source``, building it on first use; ``None`` if it cannot be
    built or ``RANGERDL_CPU_KERNEL=0`` is set.

    Args:
        source: the C file.
        declare: sets the argument and result types of the library's functions.
        what: who uses it, for the log line and the warning (``"Ranger"``).
        fallback: what happens without it, for the warning.

    Warns (once per process and file) when the compiler is missing or fails.
    """
    if os.environ.get("RANGERDL_CPU_KERNEL") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    with _lock:
        if (str(source), compiler) in _loaded:
            return _loaded[str(source), compiler]
        lib = None
        path = shutil.which(compiler)
        if path is None:
            warnings.warn(
                f"{what}: no C compiler ({compiler!r}) found; {fallback}",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            parts = (source.read_text(), " ".join(FLAGS), path, _cpu_id(), torch.__version__)
            key = hashlib.sha256(b"\0".join(s.encode() for s in parts)).hexdigest()[:16]
            cache = Path(os.environ.get("RANGERDL_CACHE", Path.home() / ".cache" / "rangerdl"))
            target = cache / f"{source.stem.lstrip('_')}_{key}.so"
            try:
                if not target.exists():
                    start = time.perf_counter()
                    _build(path, source, target)
                    logger.info(
                        "%s: built the CPU kernel %s in %.1f s (once per machine): %s",
                        what,
                        source.name,
                        time.perf_counter() - start,
                        target,
                    )
                lib = ctypes.CDLL(str(target))
                declare(lib)
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", b"") or b""
                warnings.warn(
                    f"{what}: building the CPU kernel {source.name} with {path} failed ({e}; "
                    f"{detail.decode(errors='replace')[:500]}); {fallback}",
                    RuntimeWarning,
                    stacklevel=4,
                )
                lib = None
        _loaded[str(source), compiler] = lib
        return lib
