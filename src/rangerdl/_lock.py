"""One writer per folder: an OS file lock (``fcntl.flock``) that the kernel releases when its
holder dies, however it dies.

Pure standard library, shared by ``rangerdl.data`` (``data prepare``) and ``rangerdl.train``
(run folders)::

    with FolderLock(run_dir, what="run folder"):
        ...                                   # a second holder gets FolderInUseError

The lock file is a hidden sibling, ``PARENT/.NAME.lock``, so a folder can be locked before it
exists and while it is renamed or replaced; it holds the holder's PID and host name, and is
removed on release. ``flock`` locks are advisory, per open file, and reliable on local file
systems (on NFS only where the client maps them to NFS locks).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

__all__ = ["FolderInUseError", "FolderLock", "pid_alive"]

_READ_HOLDER_S = 0.5  # how long to wait for a new holder to write its PID


class FolderInUseError(ValueError):
    """Another process holds the folder's lock; ``pid`` (None if unknown) and ``host`` name it."""

    def __init__(self, message: str, pid: int | None, host: str | None) -> None:
        super().__init__(message)
        self.pid = pid
        self.host = host


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive, non-blocking lock on ``path`` (a folder that need not exist yet).

    Args:
        path: the folder to lock; its parent must exist when the lock is taken.
        what: how messages call the folder (``"dataset folder"``, ``"run folder"``).

    Raises (from ``acquire`` / ``with``):
        FolderInUseError: another process holds the lock; the message names its PID and host.
    """

    def __init__(self, path: str | os.PathLike[str], *, what: str = "folder") -> None:
        self.path = Path(path)
        self.what = what
        self.lock_path = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`FolderInUseError` at once (never waits for it)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.lock_path} is already held by this FolderLock")
        for _ in range(100):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                try:
                    pid, host = _read_holder(fd)
                finally:
                    os.close(fd)
                raise self._in_use(pid, host) from None
            # A releasing holder unlinks the file before it unlocks: retry if we locked a file
            # that is no longer the one at lock_path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            self._fd = fd
            return self
        raise RuntimeError(f"could not take the lock {self.lock_path}: it keeps being replaced")

    def release(self) -> None:
        """Remove the lock file and unlock; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _in_use(self, pid: int | None, host: str | None) -> FolderInUseError:
        here = socket.gethostname()
        who = "another process" if pid is None else f"process {pid}"
        if host and host != here:
            who += f" on host {host}"
        return FolderInUseError(
            f"{self.what} {self.path} is in use by {who} (it holds {self.lock_path}); wait for "
            "it to finish or stop it, then try again",
            pid,
            host,
        )

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FolderLock({str(self.path)!r}, held={self.held})"


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    """PID and host written by the lock's holder (it writes them just after locking)."""
    deadline = time.monotonic() + _READ_HOLDER_S
    while True:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").split()
        if len(text) >= 2 and text[0].isdigit():
            return int(text[0]), text[1]
        if time.monotonic() > deadline:
            return None, None
        time.sleep(0.02)
