"""Durable file writes shared by the data format, checkpoints and run folders.

Pure standard library, so ``rangerdl.data`` and ``rangerdl.train`` can both use it without
depending on each other.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["DiskFullError", "atomic_write_bytes", "atomic_write_text", "fsync_dir"]


class DiskFullError(OSError):
    """A write failed for lack of space (``ENOSPC``/``EDQUOT``); the message names the path and
    the bytes the write needed. Whatever was there before is intact."""


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
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                exc.errno, f"no space left to write {path} ({len(data)} bytes needed)"
            ) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))
