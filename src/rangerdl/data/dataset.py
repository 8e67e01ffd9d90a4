"""``SegmentedDataset``: read a segmented dataset as a map-style torch Dataset; ``collate``.

Opening a dataset checks every segment file (size, dtype, shape, and by default its sha256 once
per file, remembered: see ``integrity.py``) and, when the file-descriptor limit allows, keeps every
file open, so a dataset replaced or deleted under a running job (``prepare --overwrite``) still
reads the data the job started with. Segments are mapped lazily in the process that reads (so
DataLoader workers map their own, under fork and spawn), at most ``max_open_segments`` at a time
(least recently used maps are closed; each map holds a file descriptor). That cache is sized again
from the limit in force whenever it is about to grow, and shrinks when a map fails for want of
descriptors: a job whose limit was lowered reads on with fewer maps, and only a limit that leaves
no room for even one segment is an error. Every sample is returned
as a copy: a tensor that views a read-only map segfaults on the first in-place write, and a map
with live views could not be closed. ``__getitems__`` gathers a whole batch per segment straight
into the batch tensors, which ``collate`` passes through without another copy.

A file that changed after the dataset was opened (replaced, truncated, rewritten) is an error
naming it when its map is (re)opened, and a truncation is also checked once per batch. A file
truncated while a read is under way cannot be caught: the kernel kills the process with SIGBUS
("Bus error"; ``faulthandler`` prints where). Never modify segment files in place: ``prepare
--overwrite`` writes new files and leaves the old ones to the jobs that hold them open.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import errno
import logging
import mmap
import operator
import os
import resource
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rangerdl.data.integrity import Identity, file_identity, is_verified, record_verified
from rangerdl.data.manifest import (
    MANIFEST_NAME,
    TOKENS_FIELD,
    FieldSpec,
    Manifest,
    sha256_file,
    split_order,
    verify_file,
)

__all__ = ["VERIFY_MODES", "SampleBatch", "SegmentedDataset", "collate", "open_splits"]

logger = logging.getLogger(__name__)

VERIFY_MODES = ("sizes", "cached", "checksum")
LABEL_FIELD = "y"
# Of the soft RLIMIT_NOFILE: all datasets of a process keep at most a quarter of it as open
# files, and each dataset maps at most an eighth of it at a time.
_PINNED_SHARE = 4
_MAPPED_SHARE = 8
_PINNED = [0]  # files held open by the datasets of this process
# Descriptors a growing map cache leaves free for the rest of the process (checkpoint and log
# files, DataLoader pipes); only the floor of one mapped segment may dip into them.
_FD_RESERVE = 32
_LOG_HASH_BYTES = 256 << 20


def _torch_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype samples are returned in: unsigned ints widen to int64 (torch lacks their arithmetic)."""
    return np.dtype(np.int64) if dtype.kind == "u" else dtype


def fd_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` of this process (``ulimit -n``)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def open_fd_count() -> int | None:
    """File descriptors open in this process now (a directory listing: call it sparingly), or
    None where that cannot be counted."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing them
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return fd_limit()  # not even one left to count them with
        return None


def _out_of_fds(exc: OSError) -> bool:
    return exc.errno in (errno.EMFILE, errno.ENFILE)


class SegmentedDataset(Dataset[dict[str, Tensor]]):
    """A map-style dataset over a segmented directory; ``ds[i]`` is a dict of tensors.

    Rows datasets return their fields as written (unsigned ints widened to int64). Token datasets
    return ``{"x": tokens[i*L : i*L+L], "y": tokens[i*L+1 : i*L+L+1]}`` as int64 (next-token
    prediction; windows do not overlap, except for the one token ``y`` looks ahead). Every tensor is
    a copy, never a view of the map. ``ds[None]`` is a padding sample (zeros and ``"mask": False``),
    which ``GlobalBatchSampler(drop_last=False)`` asks for and ``collate`` turns into a mask.

    Opening reads the manifest and checks every file (see ``verify``), and keeps the files open
    when the file-descriptor limit allows (a quarter of it for all datasets of the process). The
    data is mapped lazily by the process that reads it, so the object pickles as its path
    (DataLoader workers under fork or spawn map their own) and an unpickled copy refuses to read if
    the manifest was replaced in the meantime. Labels of a classification dataset (field ``y``,
    metadata ``num_classes``) are checked as they are read.

    Args:
        path: the dataset directory (holding ``manifest.json``).
        verify: ``"sizes"`` checks presence, size, dtype and shape of every file; ``"cached"``
            (the default) also checks the sha256 of each file's data once, remembered while the
            file is unchanged (same inode, size and times; in ``.verified.json`` and in memory);
            ``"checksum"`` hashes all data on every open.
        max_open_segments: segments mapped at a time (each map holds one file descriptor per
            field); default an eighth of ``ulimit -n`` divided by the number of fields. Either
            way fewer when the open-file limit in force leaves no room for more (at least one).

    Raises:
        FileNotFoundError: the directory, its manifest or a segment file is missing.
        ValueError: the manifest is malformed or does not match a file; the message names the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        verify: str = "cached",
        *,
        max_open_segments: int | None = None,
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        if max_open_segments is not None and (
            not isinstance(max_open_segments, int) or max_open_segments < 1
        ):
            raise ValueError(f"max_open_segments must be a positive int, got {max_open_segments!r}")
        self.path = Path(path)
        self.verify = verify
        self._max_open_arg = max_open_segments
        self._fds: dict[tuple[int, str], int] = {}
        manifest = Manifest.read(self.path)
        self._setup(manifest)
        self._open_files(verify)

    def _setup(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._checksum = manifest.checksum
        self._starts_array = np.cumsum([0] + [s.num_rows for s in manifest.segments])
        self._starts: list[int] = self._starts_array.tolist()
        self._maps: OrderedDict[int, dict[str, np.ndarray[Any, Any]]] = OrderedDict()
        self._mmaps: dict[int, list[tuple[str, mmap.mmap]]] = {}
        self._checked: dict[int, int] = {}  # segment -> the batch that last checked its sizes
        self._shrunk = False  # the open-file limit made the map cache smaller (said once)
        self._fd_limit_seen = -1  # the limit when the descriptors in use were last counted
        self._growth_left = 0  # maps that may be added before counting them again
        self._batch = 0
        self._identity: dict[tuple[int, str], Identity] = {}
        self._header: dict[tuple[int, str], int] = {}
        if not hasattr(self, "_fds"):
            self._fds = {}
        num_fields = len(manifest.fields)
        default = max(1, fd_limit() // _MAPPED_SHARE // num_fields)
        self.max_open_segments = min(self._max_open_arg or default, len(manifest.segments))
        self._label_limit = self._find_label_limit(manifest)

    def _find_label_limit(self, manifest: Manifest) -> int | None:
        meta = manifest.metadata
        spec = manifest.fields.get(LABEL_FIELD)
        limit = meta.get("num_classes")
        if manifest.kind == "tokens":
            spec, limit = manifest.fields[TOKENS_FIELD], meta.get("vocab_size")
        elif meta.get("task") != "classification":
            return None
        if spec is None or spec.dtype.kind not in "iu" or spec.shape != ():
            return None
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            return None
        return None if int(np.iinfo(spec.dtype).max) < limit and spec.dtype.kind == "u" else limit

    def _open_files(self, verify: str) -> None:
        """Check every file, hold them open if the fd budget allows, verify checksums."""
        manifest = self._manifest
        keys = [(s, name) for s, seg in enumerate(manifest.segments) for name in seg.files]
        pin = _PINNED[0] + len(keys) <= fd_limit() // _PINNED_SHARE
        try:
            for s, name in keys:
                info = manifest.segments[s].files[name]
                path = self.path / info.name
                spec = manifest.fields[name]
                self._header[s, name] = verify_file(
                    path, info, spec, manifest.segments[s].num_rows, checksum=False
                )
                if pin:
                    try:
                        fd = self._open_fd(path)
                    except OSError as exc:
                        if not _out_of_fds(exc):
                            raise
                        raise self._too_many_files(exc, f"opening {info.name}") from exc
                    self._fds[s, name] = fd
                    _PINNED[0] += 1
                    identity = file_identity(fd)
                    if identity[:4] != file_identity(path)[:4]:
                        raise ValueError(f"{path}: changed while the dataset was being opened")
                else:
                    identity = file_identity(path)
                self._identity[s, name] = identity
            if verify != "sizes":
                self._verify_checksums(keys, cached=verify == "cached")
        except BaseException:
            self.close()
            raise

    def _verify_checksums(self, keys: list[tuple[int, str]], cached: bool) -> None:
        files = self._manifest.segments
        todo = [
            (s, name)
            for s, name in keys
            if not (
                cached
                and is_verified(
                    self.path,
                    files[s].files[name].name,
                    self._identity[s, name],
                    files[s].files[name].sha256,
                )
            )
        ]
        total = sum(self._identity[k][2] for k in todo)
        if total > _LOG_HASH_BYTES:
            logger.info(
                "verifying the sha256 of %.0f MiB in %s%s",
                total / 2**20,
                self.path,
                " (once; remembered while the files are unchanged)" if cached else "",
            )
        done = {}
        for s, name in todo:
            info = files[s].files[name]
            path = self.path / info.name
            digest = sha256_file(path, self._header[s, name])
            if digest != info.sha256:
                raise ValueError(
                    f"{path}: sha256 of the data is {digest}, the manifest says {info.sha256}: "
                    "the file changed after it was written"
                )
            if file_identity(path)[:4] != self._identity[s, name][:4]:
                raise ValueError(f"{path}: changed while its checksum was being verified")
            done[info.name] = (self._identity[s, name], digest)
        if cached:
            record_verified(self.path, done)

    def _open_fd(self, path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: segment file removed after the dataset was opened (was the dataset "
                "re-prepared or deleted while this job ran?); reopen the dataset"
            ) from None

    def close(self) -> None:
        """Close the maps (samples are copies, so none is in use) and the files held open."""
        self._maps.clear()
        self._mmaps.clear()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            _PINNED[0] -= 1
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "verify": self.verify,
            "checksum": self._checksum,
            "max_open_segments": self._max_open_arg,
            "files": [
                [s, name, list(identity), self._header[s, name]]
                for (s, name), identity in self._identity.items()
            ],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.verify = state["verify"]
        self._max_open_arg = state.get("max_open_segments")
        self._fds = {}
        manifest = Manifest.read(self.path)
        if manifest.checksum != state["checksum"]:
            raise ValueError(
                f"{self.path / MANIFEST_NAME} changed after the dataset was opened "
                f"(checksum {manifest.checksum[:12]}, opened as {state['checksum'][:12]})"
            )
        self._setup(manifest)
        for s, name, identity, header in state["files"]:
            self._identity[s, name] = tuple(identity)
            self._header[s, name] = header

    @property
    def metadata(self) -> dict[str, Any]:
        """The manifest's free-form metadata (a copy)."""
        return copy.deepcopy(self._manifest.metadata)

    @property
    def checksum(self) -> str:
        """sha256 identifying the manifest's content (data checksums, fields, metadata)."""
        return self._checksum

    @property
    def kind(self) -> str:
        """``"rows"`` or ``"tokens"``."""
        return self._manifest.kind

    @property
    def seq_len(self) -> int | None:
        """Window length of a token dataset, else None."""
        return self._manifest.seq_len

    @property
    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored fields: name -> (dtype name, per-sample shape)."""
        return {n: (s.dtype.name, s.shape) for n, s in self._manifest.fields.items()}

    @property
    def num_segments(self) -> int:
        """Number of segments."""
        return len(self._manifest.segments)

    @property
    def nbytes(self) -> int:
        """Bytes of all segment files."""
        return self._manifest.nbytes

    @property
    def manifest(self) -> Manifest:
        """The parsed manifest."""
        return self._manifest

    def __len__(self) -> int:
        return self._manifest.num_samples

    def __repr__(self) -> str:
        return (
            f"SegmentedDataset({str(self.path)!r}, kind={self.kind!r}, num_samples={len(self)}, "
            f"num_segments={self.num_segments})"
        )

    def __getitem__(self, index: int | None) -> dict[str, Tensor]:
        if index is None:
            return self._padding()
        i = self._check_index(index)
        if self.kind == "tokens":
            seq_len = self._seq_len()
            window = self._tokens(i * seq_len, i * seq_len + seq_len + 1)
            if self._label_limit is not None:
                self._check_labels(window, np.array([i]))
            return {"x": torch.from_numpy(window[:-1]), "y": torch.from_numpy(window[1:].copy())}
        s = bisect.bisect_right(self._starts, i) - 1
        maps = self._segment(s)
        j = i - self._starts[s]
        out = {}
        for name, spec in self._manifest.fields.items():
            value = np.array(maps[name][j], dtype=_torch_dtype(spec.dtype))
            limit = self._label_limit if name == LABEL_FIELD else None
            if limit is not None and not 0 <= value.item() < limit:  # no numpy reductions
                self._check_labels(value.reshape(1), np.array([i]))
            out[name] = torch.from_numpy(value)
        return out

    def __getitems__(self, indices: Sequence[int | None]) -> SampleBatch:
        """Samples ``indices`` (None: padding) read together; DataLoader calls this per batch.

        One gather per segment and field straight into the batch's tensors, so ``collate`` has
        nothing left to copy. The result is a sequence of per-sample dicts for any other collate.
        """
        n = len(self)
        pads = [k for k, i in enumerate(indices) if i is None]
        idx = np.fromiter((0 if i is None else operator.index(i) for i in indices), np.int64)
        idx[idx < 0] += n
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise IndexError(f"index {indices[k]} out of range for a dataset of {n} samples")
        self._batch += 1  # each segment it reads is checked for truncation once (an fstat per file)
        if self.kind == "tokens":
            columns = self._token_windows(idx)
        else:
            columns = {
                name: self._gather(name, spec, idx) for name, spec in self._manifest.fields.items()
            }
        mask = None
        if pads:
            for column in columns.values():
                column[pads] = 0
            mask = torch.ones(len(idx), dtype=torch.bool)
            mask[pads] = False
        return SampleBatch(columns, mask)

    def _gather(self, name: str, spec: FieldSpec, idx: np.ndarray[Any, Any]) -> Tensor:
        out = np.empty((len(idx), *spec.shape), spec.dtype)
        if len(self._starts) == 2:  # one segment: a single gather
            np.take(self._segment(0, check=True)[name], idx, axis=0, out=out)
        else:
            seg_of = np.searchsorted(self._starts_array, idx, side="right") - 1
            for s in np.unique(seg_of).tolist():
                rows = np.flatnonzero(seg_of == s)
                # No reference to a map outlives the statement: an evicted map unmaps at once.
                out[rows] = np.take(
                    self._segment(s, check=True)[name], idx[rows] - self._starts[s], axis=0
                )
        if name == LABEL_FIELD and self._label_limit is not None:
            self._check_labels(out, idx)
        wide = _torch_dtype(spec.dtype)
        return torch.from_numpy(out if wide == spec.dtype else out.astype(wide))

    def _check_labels(self, values: np.ndarray[Any, Any], idx: np.ndarray[Any, Any]) -> None:
        """Raise ValueError naming the file and row of the first value outside the label range."""
        limit = self._label_limit
        assert limit is not None
        if not values.size or (values.min() >= 0 and values.max() < limit):
            return
        k = int(np.flatnonzero((values < 0) | (values >= limit))[0])
        field = TOKENS_FIELD if self.kind == "tokens" else LABEL_FIELD
        if self.kind == "tokens":  # windows of seq_len + 1 tokens: the token's stream position
            window, offset = divmod(k, self._seq_len() + 1)
            row = int(idx[window]) * self._seq_len() + offset
        else:
            row = int(idx[k])
        s = bisect.bisect_right(self._starts, row) - 1
        path = self.path / self._manifest.segments[s].files[field].name
        what = "vocab_size" if self.kind == "tokens" else "num_classes"
        raise ValueError(
            f"{path}: row {row - self._starts[s]} holds {field} {int(values.flat[k])}, outside "
            f"[0, {limit}) ({what} in {self.path / MANIFEST_NAME}): the file is damaged or was "
            f"changed after it was written; `rangerdl data inspect {self.path}` checks it"
        )

    def _check_index(self, index: Any) -> int:
        n = len(self)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        return i

    def _seq_len(self) -> int:
        seq_len = self._manifest.seq_len
        assert seq_len is not None
        return seq_len

    def _segment(self, s: int, check: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        """The maps of segment ``s``; ``check``: first make sure no file was truncated since."""
        maps = self._maps.get(s)
        if maps is None:
            return self._map_segment(s)
        if len(self._maps) > 1:
            self._maps.move_to_end(s)
        if check and self._checked.get(s) != self._batch:
            self._checked[s] = self._batch
            for name, mm in self._mmaps[s]:
                size = mm.size()  # fstat of the mapped file
                if size != self._identity[s, name][2]:
                    self._changed(s, name, (*self._identity[s, name][:2], size))
        return maps

    def _map_segment(self, s: int) -> dict[str, np.ndarray[Any, Any]]:
        if len(self._maps) < self.max_open_segments:  # about to grow
            self._fit_to_fd_limit()
        while True:
            while len(self._maps) >= self.max_open_segments:
                self._evict()
            try:
                mmaps = self._open_maps(s)
                break
            except OSError as exc:
                if not _out_of_fds(exc):
                    raise
                if not self._maps:
                    raise self._too_many_files(exc, f"mapping {exc.filename}") from exc
                self._growth_left = 0
                self._resize(len(self._maps))  # one map fewer, then try again
        segment = self._manifest.segments[s]
        maps: dict[str, np.ndarray[Any, Any]] = {}
        for name, mm in mmaps:
            spec = self._manifest.fields[name]
            count = segment.num_rows * int(np.prod(spec.shape, dtype=np.int64))
            array = np.frombuffer(mm, spec.dtype, count, self._header[s, name])
            maps[name] = array.reshape(segment.num_rows, *spec.shape)
        self._maps[s] = maps
        self._mmaps[s] = mmaps
        return maps

    def _open_maps(self, s: int) -> list[tuple[str, mmap.mmap]]:
        """A read-only map of each file of segment ``s`` (each holds a descriptor). On an error
        none stays open; one for want of descriptors names the file (``filename``)."""
        mmaps: list[tuple[str, mmap.mmap]] = []
        try:
            for name, info in self._manifest.segments[s].files.items():
                pinned = self._fds.get((s, name))
                try:
                    fd = self._open_fd(self.path / info.name) if pinned is None else pinned
                    try:
                        identity = file_identity(fd)
                        if identity[:4] != self._identity[s, name][:4]:
                            self._changed(s, name, identity)
                        mmaps.append((name, mmap.mmap(fd, 0, access=mmap.ACCESS_READ)))  # dups fd
                    finally:
                        if pinned is None:
                            os.close(fd)
                except OSError as exc:
                    if _out_of_fds(exc):
                        raise OSError(exc.errno, exc.strerror, info.name) from exc
                    raise
        except BaseException:
            for _, mm in mmaps:
                mm.close()  # nothing views them yet
            raise
        return mmaps

    def _evict(self) -> None:
        # Samples are copies, so nothing views the evicted maps: dropping them unmaps.
        old, _ = self._maps.popitem(last=False)
        del self._mmaps[old]

    def _fit_to_fd_limit(self) -> None:
        """Size the map cache from the open-file limit in force. Reading the limit is cheap;
        counting the descriptors in use (a directory listing, milliseconds with thousands open)
        happens only when the limit changed or the growth the last count allowed is used up."""
        limit = fd_limit()
        if limit == self._fd_limit_seen and self._growth_left > 0:
            self._growth_left -= 1
            return
        per_segment = len(self._manifest.fields)
        cap = self._max_open_arg or max(1, limit // _MAPPED_SHARE // per_segment)
        cap = min(cap, len(self._manifest.segments))
        in_use = open_fd_count()
        room = cap
        if in_use is not None:
            opening = 0 if self._fds else 1  # a file opened to be mapped, closed right after
            room = (limit - in_use - _FD_RESERVE - opening) // per_segment
            cap = min(cap, len(self._maps) + room)
        # Half the room without counting again: the rest of the process may open files meanwhile.
        self._fd_limit_seen, self._growth_left = limit, room // 2
        self._resize(max(1, cap))

    def _resize(self, capacity: int) -> None:
        if capacity < self.max_open_segments and not self._shrunk:
            self._shrunk = True
            logger.warning(
                "%s: the open-file limit (ulimit -n, RLIMIT_NOFILE) of %d with %s files open "
                "leaves room for %d mapped segment(s) of this dataset, not %d; reading goes on "
                "with fewer (raise the limit to restore them)",
                self.path,
                fd_limit(),
                open_fd_count(),
                capacity,
                self.max_open_segments,
            )
        self.max_open_segments = capacity

    def _changed(self, s: int, name: str, now: Identity) -> None:
        path = self.path / self._manifest.segments[s].files[name].name
        before = self._identity[s, name]
        if now[2] != before[2]:
            what = f"its size is {now[2]} bytes, it was {before[2]}"
        elif now[:2] != before[:2]:
            what = "another file replaced it"
        else:
            what = "it was modified"
        raise ValueError(
            f"{path}: segment file changed after the dataset was opened ({what}); a dataset "
            "must not be modified while a job reads it (prepare --overwrite writes new files)"
        )

    def _too_many_files(self, exc: OSError, doing: str) -> OSError:
        """The error when ``doing`` (``"mapping NAME"``, ...) failed for want of descriptors."""
        in_use = open_fd_count()
        files = len(self._manifest.fields)
        mapping = doing.startswith("mapping")
        return OSError(
            exc.errno,
            f"{self.path}: too many open files {doing}: the limit (ulimit -n, RLIMIT_NOFILE) is "
            f"{fd_limit()}{'' if in_use is None else f' and {in_use} files are open'}"
            + (f", so not even one segment ({files} file(s)) can be mapped" if mapping else "")
            + ": raise the limit, or close other files",
        )

    def _tokens(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Tokens ``[start, stop)`` of the stream as a fresh int64 array (may span segments)."""
        out = np.empty(stop - start, np.int64)
        s = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            seg_start, seg_stop = self._starts[s], self._starts[s + 1]
            take = min(stop, seg_stop) - pos
            out[pos - start : pos - start + take] = self._segment(s)[TOKENS_FIELD][
                pos - seg_start : pos - seg_start + take
            ]
            pos += take
            s += 1
        return out

    def _token_windows(self, idx: np.ndarray[Any, Any]) -> dict[str, Tensor]:
        seq_len = self._seq_len()
        starts = idx * seq_len
        windows = np.empty((len(idx), seq_len + 1), np.int64)
        seg_first = np.searchsorted(self._starts_array, starts, side="right") - 1
        seg_last = np.searchsorted(self._starts_array, starts + seq_len, side="right") - 1
        offsets = np.arange(seq_len + 1)
        for s in np.unique(seg_first).tolist():
            inside = np.flatnonzero((seg_first == s) & (seg_last == s))
            if len(inside):
                local = starts[inside] - self._starts[s]
                # No reference to a map outlives the statement: an evicted map unmaps at once.
                windows[inside] = self._segment(s, check=True)[TOKENS_FIELD][
                    local[:, None] + offsets
                ]
        for k in np.flatnonzero(seg_first != seg_last).tolist():
            windows[k] = self._tokens(int(starts[k]), int(starts[k]) + seq_len + 1)
        if self._label_limit is not None:
            self._check_labels(windows, idx)
        return {
            "x": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
            "y": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
        }

    def _padding(self) -> dict[str, Tensor]:
        if self.kind == "tokens":
            zeros = torch.zeros(self._seq_len(), dtype=torch.int64)
            return {"x": zeros, "y": zeros.clone(), "mask": torch.tensor(False)}
        out = {
            name: torch.from_numpy(np.zeros(spec.shape, _torch_dtype(spec.dtype)))
            for name, spec in self._manifest.fields.items()
        }
        out["mask"] = torch.tensor(False)
        return out


class SampleBatch(Sequence[dict[str, Tensor]]):
    """Samples read together by ``SegmentedDataset.__getitems__``: batch tensors plus per-sample views.

    ``collate`` returns the columns as they are (no copy); any other collate function sees a
    sequence of per-sample dicts, like ``[ds[i] for i in indices]``.
    """

    def __init__(self, columns: dict[str, Tensor], mask: Tensor | None = None) -> None:
        self.columns = columns
        self.mask = mask

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    @overload
    def __getitem__(self, k: int) -> dict[str, Tensor]: ...

    @overload
    def __getitem__(self, k: slice) -> list[dict[str, Tensor]]: ...

    def __getitem__(self, k: int | slice) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        item = {name: column[k] for name, column in self.columns.items()}
        if self.mask is not None:  # every sample of a padded batch carries it, for any collate
            item["mask"] = self.mask[k]
        return item


def collate(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack samples into a batch: ``{"x": (B, ...), "y": (B, ...)}``.

    When any sample is padding (it has ``"mask": False``), the batch also holds ``"mask"``, a bool
    tensor of shape ``(B,)`` that is True for real samples. A ``SampleBatch`` (what the dataset's
    ``__getitems__`` returns) is already stacked and is passed through without a copy.
    """
    if isinstance(items, SampleBatch):
        batch = dict(items.columns)
        if items.mask is not None:
            batch["mask"] = items.mask
        return batch
    if not items:
        raise ValueError("collate: empty batch")
    names = [k for k in items[0] if k != "mask"]
    batch = {name: torch.stack([item[name] for item in items]) for name in names}
    if any("mask" in item for item in items):
        batch["mask"] = torch.tensor([bool(item.get("mask", True)) for item in items])
    return batch


def open_splits(
    path: str | os.PathLike[str], verify: str = "cached"
) -> dict[str, SegmentedDataset]:
    """Open the splits of a prepared directory: every sub-directory holding a ``manifest.json``.

    Every split is opened (and checked, see ``SegmentedDataset``'s ``verify``) now, so a job that
    opens its data at the start fails then, not at its final evaluation, and keeps reading the
    files it opened if the directory is re-prepared meanwhile.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` (those present; train first, then val, test,
        then any others by name).

    Raises:
        FileNotFoundError: ``path`` or ``path/train`` is missing, or ``path`` is a single dataset.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"prepared dataset directory {root} does not exist")
    if (root / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"{root} is a single dataset (it holds {MANIFEST_NAME}), not a directory of splits "
            "(train/, test/); open it with SegmentedDataset, or point at its parent"
        )
    found = sorted(p.name for p in root.iterdir() if (p / MANIFEST_NAME).is_file())
    if "train" not in found:
        detail = f"found splits {found}" if found else "no split holds a manifest.json"
        raise FileNotFoundError(
            f"{root / 'train' / MANIFEST_NAME} not found ({detail}); prepare one with "
            "'rangerdl data prepare KIND --out DIR'"
        )
    names = sorted(found, key=split_order)
    return {name: SegmentedDataset(root / name, verify=verify) for name in names}
