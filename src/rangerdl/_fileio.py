"""Durable file writes shared by the data format, checkpoints and run folders.

Pure standard library, so ``rangerdl.data`` and ``rangerdl.train`` can both use it without
depending on each other.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = [
    "DiskFullError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_free_space",
    "disk_full_error",
    "fsync_dir",
    "preallocate",
]

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed for lack of space (``ENOSPC``/``EDQUOT``); the message names the path and
    the bytes the write needed. Whatever was there before is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_error(exc: OSError, path: Path | str, needed: int) -> OSError:
    """``exc`` as a :class:`DiskFullError` naming ``path`` and ``needed`` bytes when it is
    ``ENOSPC``/``EDQUOT``; any other error is returned unchanged (callers ``raise ... from exc``)."""
    if isinstance(exc, DiskFullError) or exc.errno not in _FULL:
        return exc
    return DiskFullError(exc.errno, f"no space left to write {path} ({_size(needed)} needed)")


def check_free_space(path: Path | str, needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` unless the file system of ``path`` (or of its nearest
    existing parent) has ``needed`` bytes free; ``what`` says what is to be written."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left to write {what} in {path}: {_size(needed)} needed, "
            f"{_size(free)} free on the file system of {probe}",
        )


def preallocate(fd: int, size: int, path: Path | str) -> None:
    """Reserve ``size`` bytes of the open file ``fd`` (``posix_fallocate``) before it is
    written through a memory map: a write into a sparse map on a full disk is a SIGBUS that kills
    the process; a failed reservation is a :class:`DiskFullError` naming ``path``. File systems
    that cannot reserve space are left sparse."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in _FULL:
            raise disk_full_error(exc, path, size) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _size(num_bytes: int) -> str:
    if num_bytes < 1 << 20:
        return f"{num_bytes} bytes"
    return f"{num_bytes / 2**20:.1f} MiB ({num_bytes} bytes)"


def fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` as tmp -> fsync -> ``os.replace`` -> fsync(dir): readers see the old file or
    the new one, never half of one. On failure the temporary file is removed and ``path`` is
    untouched.

    Raises:
        DiskFullError: the file system is full (names ``path`` and ``len(data)``).
        OSError: any other write failure.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        error = disk_full_error(exc, path, len(data))
        if error is not exc:
            raise error from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))
