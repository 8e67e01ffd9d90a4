"""Remembered checksums: hash a segment file once, then trust it while it is provably unchanged.

A file's identity is ``(device, inode, size, mtime_ns, ctime_ns)``: rewriting, truncating,
replacing or copying a file changes it (``ctime`` cannot be set back by users). A file whose
data sha256 matched the manifest is remembered under its identity, in this process and in the
dataset directory's ``.verified.json`` (written when the directory is writable; the writer
writes it for the files it has just hashed). An entry counts only when it was recorded at least
``RACY_S`` seconds after the file's last change, since a change within the same tick of the file
system's clock would leave the times unchanged (git's "racy clean" rule; Linux file systems stamp
times from a clock of a few milliseconds' resolution).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rangerdl._fileio import atomic_write_text

__all__ = ["STAMP_NAME", "file_identity", "is_verified", "record_verified"]

logger = logging.getLogger(__name__)

STAMP_NAME = ".verified.json"
STAMP_VERSION = 1
RACY_S = 0.05
Identity = tuple[int, ...]
# identity -> (sha256, recorded at time_ns), for files verified by this process.
_MEMO: dict[Identity, tuple[str, int]] = {}


def file_identity(path: Path | int) -> Identity:
    """``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` of a path or an open fd."""
    st = os.fstat(path) if isinstance(path, int) else os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _trusted(identity: Identity, recorded_ns: int) -> bool:
    return recorded_ns - max(identity[3], identity[4]) >= RACY_S * 1e9


def is_verified(directory: Path, name: str, identity: Identity, sha256: str) -> bool:
    """Whether file ``name`` with this ``identity`` was hashed before and had data ``sha256``."""
    memo = _MEMO.get(identity)
    if memo is not None and memo[0] == sha256 and _trusted(identity, memo[1]):
        return True
    entry = _read_stamp(directory).get(name)
    if not isinstance(entry, dict):
        return False
    ok = (
        entry.get("identity") == list(identity)
        and entry.get("sha256") == sha256
        and isinstance(entry.get("recorded_ns"), int)
        and _trusted(identity, entry["recorded_ns"])
    )
    if ok:
        _MEMO[identity] = (sha256, entry["recorded_ns"])
    return ok


def record_verified(directory: Path, files: dict[str, tuple[Identity, str]]) -> None:
    """Remember that each file ``name -> (identity, sha256)`` held the data of its sha256 now.

    Entries for files no longer present are dropped. A read-only directory (or a full disk) keeps
    the memory of this process only.
    """
    if not files:
        return
    now = time.time_ns()
    for identity, sha256 in files.values():
        _MEMO[identity] = (sha256, now)
    stamp = _read_stamp(directory)
    stamp = {n: e for n, e in stamp.items() if (directory / n).exists()}
    for name, (identity, sha256) in files.items():
        stamp[name] = {"identity": list(identity), "sha256": sha256, "recorded_ns": now}
    text = json.dumps({"version": STAMP_VERSION, "files": stamp}, indent=0) + "\n"
    try:
        atomic_write_text(directory / STAMP_NAME, text)
    except OSError as exc:
        logger.debug("cannot remember verified checksums in %s: %s", directory / STAMP_NAME, exc)


def _read_stamp(directory: Path) -> dict[str, Any]:
    try:
        raw = json.loads((directory / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != STAMP_VERSION:
        return {}
    files = raw.get("files")
    return files if isinstance(files, dict) else {}
