"""Segmented datasets: ``SegmentWriter`` writes them, ``SegmentedDataset`` reads them.

The format is described in ``manifest.py``. The writer fills one memory-mapped ``.npy`` per field
and segment (``np.lib.format.open_memmap``), and publishes each finished file with tmp -> fsync ->
rename; the manifest goes last and is the commit marker. The reader maps segments lazily in the
process that reads (so DataLoader workers map their own, under fork and spawn) and always returns
copies: a tensor that views a read-only map segfaults on the first in-place write.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import operator
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rangerdl.data.manifest import (
    CHECKSUM_ALGORITHM,
    FORMAT,
    KINDS,
    MANIFEST_NAME,
    SEGMENT_FILE,
    TOKENS_FIELD,
    VERSION,
    FieldSpec,
    FileInfo,
    Manifest,
    SegmentInfo,
    atomic_write_text,
    check_field_name,
    check_token_fields,
    fsync_dir,
    num_samples_for,
    parse_dtype,
    parse_shape,
    read_npy_header,
)

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "SampleBatch",
    "SegmentWriter",
    "SegmentedDataset",
    "collate",
    "open_splits",
]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 512 << 20
VERIFY_MODES = ("sizes", "checksum")


@dataclass
class _OpenSegment:
    """The segment being filled: one writable map per field, hashed as it is written."""

    index: int
    capacity: int
    maps: dict[str, np.memmap[Any, Any]]
    hashes: dict[str, Any] = field(default_factory=dict)
    num_rows: int = 0


class SegmentWriter:
    """Append samples in batches to a new segmented dataset in ``out_dir``.

    Each segment holds up to ``segment_bytes`` of sample data (all fields together); a new one
    starts when it is full. A finished segment file is fsynced and renamed into place; ``close()``
    (or leaving the ``with`` block) writes ``manifest.json`` last, atomically. Until then the
    directory holds the previous dataset unchanged (segment names carry a per-write token), or
    nothing that opens; leaving the ``with`` block by an exception deletes this write's files.
    After the commit, segment files of earlier writes are deleted. One writer per directory.

    Example::

        with SegmentWriter(out, {"x": ("float32", (1, 8, 8)), "y": ("int64", ())},
                           metadata={"task": "classification", "num_classes": 10}) as w:
            w.append(x=images, y=labels)            # batches along axis 0

        with SegmentWriter(out, {"tokens": ("uint8", ())}, kind="tokens", seq_len=256) as w:
            w.append(tokens=np.frombuffer(data, np.uint8))

    Args:
        out_dir: the dataset directory (created if missing).
        fields: field name -> ``(dtype, per-sample shape)``; ``shape`` ``()`` for scalars.
        kind: ``"rows"`` (one sample per row) or ``"tokens"`` (one field ``tokens``, a 1-D stream
            read as windows of ``seq_len`` + 1 tokens).
        seq_len: window length, required for ``kind="tokens"``.
        segment_bytes: size bound of one segment.
        metadata: free-form JSON object stored in the manifest (class names, vocabulary, ...).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        fields: Mapping[str, tuple[Any, Any]],
        *,
        kind: str = "rows",
        seq_len: int | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not fields:
            raise ValueError("fields is empty; give at least one name -> (dtype, shape)")
        specs: dict[str, FieldSpec] = {}
        for name, spec in fields.items():
            check_field_name(name)
            if not isinstance(spec, (tuple, list)) or len(spec) != 2:
                raise ValueError(f"fields[{name!r}] must be (dtype, shape), got {spec!r}")
            specs[name] = FieldSpec(
                name,
                parse_dtype(spec[0], f"fields[{name!r}]"),
                parse_shape(spec[1], f"fields[{name!r}]"),
            )
        if kind == "tokens":
            check_token_fields(specs, "SegmentWriter")
            if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
                raise ValueError(
                    f"seq_len must be a positive int for kind 'tokens', got {seq_len!r}"
                )
        elif seq_len is not None:
            raise ValueError("seq_len is only used by kind 'tokens'; leave it None for 'rows'")
        if not isinstance(segment_bytes, int) or segment_bytes < 1:
            raise ValueError(f"segment_bytes must be a positive int, got {segment_bytes!r}")
        meta = dict(metadata or {})
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"metadata must be plain JSON (str, numbers, lists, dicts): {exc}"
            ) from exc
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.seq_len = seq_len
        self.fields = specs
        self.metadata = meta
        row_bytes = sum(s.sample_bytes for s in specs.values())
        self.rows_per_segment = max(1, segment_bytes // max(1, row_bytes))
        self._token: str | None = None
        self._segments: list[SegmentInfo] = []
        self._current: _OpenSegment | None = None
        self._state = "new"  # new -> open -> closed | aborted

    @property
    def num_rows(self) -> int:
        """Rows (or tokens) appended so far."""
        current = self._current.num_rows if self._current else 0
        return sum(s.num_rows for s in self._segments) + current

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, **arrays: Any) -> None:
        """Append one batch: every field, as arrays of equal length along axis 0.

        Values are cast to the field's dtype when that loses no kind of information (float64 ->
        float32, int64 -> uint8 when every value fits); anything else is a ValueError.
        """
        if self._state in ("closed", "aborted"):
            raise ValueError(f"SegmentWriter for {self.out_dir} is already {self._state}")
        if set(arrays) != set(self.fields):
            missing = sorted(set(self.fields) - set(arrays))
            unexpected = sorted(set(arrays) - set(self.fields))
            raise ValueError(f"append: missing fields {missing}, unexpected fields {unexpected}")
        batch = {name: self._convert(name, value) for name, value in arrays.items()}
        lengths = {name: len(a) for name, a in batch.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"append: fields have different lengths along axis 0: {lengths}")
        total = next(iter(lengths.values()))
        self._start()
        offset = 0
        while offset < total:
            seg = self._current if self._current is not None else self._open_segment()
            take = min(total - offset, seg.capacity - seg.num_rows)
            for name, values in batch.items():
                chunk = values[offset : offset + take]
                seg.maps[name][seg.num_rows : seg.num_rows + take] = chunk
                seg.hashes[name].update(chunk.data.cast("B"))
            seg.num_rows += take
            offset += take
            if seg.num_rows == seg.capacity:
                self._finish_segment()

    def close(self) -> Path:
        """Finish the last segment and commit: write ``manifest.json``. Returns ``out_dir``.

        Raises:
            ValueError: nothing was appended (or, for tokens, fewer than ``seq_len + 1``); the
                directory is then left as it was.
        """
        if self._state == "closed":
            return self.out_dir
        if self._state == "aborted":
            raise ValueError(f"SegmentWriter for {self.out_dir} was aborted; nothing to commit")
        num_rows = self.num_rows
        num_samples = num_samples_for(self.kind, num_rows, self.seq_len)
        if num_samples == 0:
            self.abort()
            unit = "rows" if self.kind == "rows" else f"tokens (need seq_len + 1 = {self.seq_len})"
            raise ValueError(f"{self.out_dir}: no samples to write: {num_rows} {unit}")
        if self._current is not None:
            self._finish_segment()
        raw = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "seq_len": self.seq_len,
            "fields": {name: spec.to_json() for name, spec in self.fields.items()},
            "num_rows": num_rows,
            "num_samples": num_samples,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "segments": [
                {
                    "num_rows": s.num_rows,
                    "files": {
                        name: {"name": f.name, "bytes": f.bytes, "sha256": f.sha256}
                        for name, f in s.files.items()
                    },
                }
                for s in self._segments
            ],
            "metadata": self.metadata,
        }
        manifest = Manifest.from_json(raw, f"{self.out_dir / MANIFEST_NAME} (being written)")
        atomic_write_text(self.out_dir / MANIFEST_NAME, json.dumps(raw, indent=1) + "\n")
        self._state = "closed"
        self._remove_stale(keep={f.name for s in self._segments for f in s.files.values()})
        logger.debug(
            "wrote %s: %d samples, %d segment(s), %.1f MiB",
            self.out_dir,
            num_samples,
            len(self._segments),
            manifest.nbytes / 2**20,
        )
        return self.out_dir

    def abort(self) -> None:
        """Delete this write's files; the directory keeps whatever dataset it had before."""
        if self._state in ("closed", "aborted"):
            return
        self._current = None  # drops the maps
        if self._token is not None:
            for path in self.out_dir.glob(f"seg-*-{self._token}.*"):
                if SEGMENT_FILE.match(path.name):
                    path.unlink(missing_ok=True)
        self._state = "aborted"

    def _start(self) -> None:
        if self._state == "new":
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._token = secrets.token_hex(4)
            self._state = "open"

    def _file_name(self, index: int, name: str) -> str:
        return f"seg-{index:05d}-{self._token}.{name}.npy"

    def _convert(self, name: str, value: Any) -> np.ndarray[Any, Any]:
        spec = self.fields[name]
        arr = np.asarray(value)
        if arr.ndim != 1 + len(spec.shape) or arr.shape[1:] != spec.shape:
            raise ValueError(
                f"append: field {name!r} has shape {arr.shape}, expected (n, {', '.join(map(str, spec.shape))})"
                if spec.shape
                else f"append: field {name!r} has shape {arr.shape}, expected a 1-D batch (n,)"
            )
        if arr.dtype != spec.dtype:
            both_int = arr.dtype.kind in "biu" and spec.dtype.kind in "iu"
            if not (both_int or np.can_cast(arr.dtype, spec.dtype, casting="same_kind")):
                raise ValueError(
                    f"append: field {name!r} is {spec.dtype.name}; cannot store {arr.dtype} in it"
                )
            if both_int and not np.can_cast(arr.dtype, spec.dtype, casting="safe") and arr.size:
                info = np.iinfo(spec.dtype)
                low, high = int(arr.min()), int(arr.max())
                if low < info.min or high > info.max:
                    raise ValueError(
                        f"append: field {name!r} is {spec.dtype.name} [{info.min}, {info.max}]; "
                        f"got values in [{low}, {high}]"
                    )
            arr = arr.astype(spec.dtype)
        return np.ascontiguousarray(arr)

    def _open_segment(self) -> _OpenSegment:
        index = len(self._segments)
        maps = {}
        for name, spec in self.fields.items():
            tmp = self.out_dir / (self._file_name(index, name) + ".tmp")
            # Sized for a full segment; a short last segment is cut down in _finish_segment.
            # The file is sparse until written, so the size bound costs no disk up front.
            maps[name] = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=spec.dtype, shape=(self.rows_per_segment, *spec.shape)
            )
        hashes = {name: hashlib.sha256() for name in self.fields}
        self._current = _OpenSegment(index, self.rows_per_segment, maps, hashes)
        return self._current

    def _finish_segment(self) -> None:
        seg = self._current
        assert seg is not None and seg.num_rows > 0
        files = {}
        for values in seg.maps.values():
            values.flush()
        seg.maps.clear()  # unmaps: these were the only references
        for name, spec in self.fields.items():
            final = self.out_dir / self._file_name(seg.index, name)
            tmp = final.with_name(final.name + ".tmp")
            _shrink_npy(tmp, spec, seg.num_rows, seg.capacity)
            os.replace(tmp, final)
            files[name] = FileInfo(final.name, final.stat().st_size, seg.hashes[name].hexdigest())
        fsync_dir(self.out_dir)
        self._segments.append(SegmentInfo(seg.num_rows, files))
        self._current = None

    def _remove_stale(self, keep: set[str]) -> None:
        for path in self.out_dir.iterdir():
            if SEGMENT_FILE.match(path.name) and path.name not in keep:
                path.unlink(missing_ok=True)


def _shrink_npy(path: Path, spec: FieldSpec, num_rows: int, capacity: int) -> None:
    """fsync ``path``; if it holds fewer rows than its capacity, rewrite the header and truncate.

    numpy pads every header for 21 digits of axis 0, so the rewritten header has the same length
    and the data stays where it is.
    """
    with open(path, "r+b") as fh:
        if num_rows < capacity:
            version = np.lib.format.read_magic(fh)
            fh.seek(0)
            _, _, _, header_bytes = read_npy_header(path)
            header = {
                "descr": np.lib.format.dtype_to_descr(spec.dtype),
                "fortran_order": False,
                "shape": (num_rows, *spec.shape),
            }
            if version == (1, 0):
                np.lib.format.write_array_header_1_0(fh, header)
            else:
                np.lib.format.write_array_header_2_0(fh, header)
            if fh.tell() != header_bytes:
                raise RuntimeError(f"{path}: the rewritten .npy header changed length")
            fh.truncate(header_bytes + num_rows * spec.sample_bytes)
        fh.flush()
        os.fsync(fh.fileno())


def _torch_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype samples are returned in: unsigned ints widen to int64 (torch lacks their arithmetic)."""
    return np.dtype(np.int64) if dtype.kind == "u" else dtype


class SegmentedDataset(Dataset[dict[str, Tensor]]):
    """A map-style dataset over a segmented directory; ``ds[i]`` is a dict of tensors.

    Rows datasets return their fields as written (unsigned ints widened to int64). Token datasets
    return ``{"x": tokens[i*L : i*L+L], "y": tokens[i*L+1 : i*L+L+1]}`` as int64 (next-token
    prediction; windows do not overlap, except for the one token ``y`` looks ahead). Every tensor is
    a copy, never a view of the map. ``ds[None]`` is a padding sample (zeros and ``"mask": False``),
    which ``GlobalBatchSampler(drop_last=False)`` asks for and ``collate`` turns into a mask.

    Opening reads the manifest and every ``.npy`` header and checks them (a few small reads per
    segment); the data is mapped lazily by the process that reads it, so the object pickles as its
    path (DataLoader workers under fork or spawn map their own) and an unpickled copy refuses to
    read if the manifest was replaced in the meantime.

    Args:
        path: the dataset directory (holding ``manifest.json``).
        verify: ``"sizes"`` checks presence, size, dtype and shape of every file;
            ``"checksum"`` also hashes all data against the manifest (reads everything once).

    Raises:
        FileNotFoundError: the directory, its manifest or a segment file is missing.
        ValueError: the manifest is malformed or does not match a file; the message names the file.
    """

    def __init__(self, path: str | os.PathLike[str], verify: str = "sizes") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        self.verify = verify
        manifest = Manifest.read(self.path)
        manifest.verify(self.path, checksum=verify == "checksum")
        self._setup(manifest)

    def _setup(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._checksum = manifest.checksum
        self._starts_array = np.cumsum([0] + [s.num_rows for s in manifest.segments])
        self._starts: list[int] = self._starts_array.tolist()
        self._maps: list[dict[str, np.ndarray[Any, Any]] | None] = [None] * len(manifest.segments)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "verify": self.verify, "checksum": self._checksum}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.verify = state["verify"]
        manifest = Manifest.read(self.path)
        if manifest.checksum != state["checksum"]:
            raise ValueError(
                f"{self.path / MANIFEST_NAME} changed after the dataset was opened "
                f"(checksum {manifest.checksum[:12]}, opened as {state['checksum'][:12]})"
            )
        self._setup(manifest)

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
            return {"x": torch.from_numpy(window[:-1]), "y": torch.from_numpy(window[1:].copy())}
        s = bisect.bisect_right(self._starts, i) - 1
        maps = self._segment(s)
        j = i - self._starts[s]
        out = {}
        for name, spec in self._manifest.fields.items():
            value = np.array(maps[name][j], dtype=_torch_dtype(spec.dtype))
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
            np.take(self._segment(0)[name], idx, axis=0, out=out)
        else:
            seg_of = np.searchsorted(self._starts_array, idx, side="right") - 1
            for s in np.unique(seg_of).tolist():
                rows = np.flatnonzero(seg_of == s)
                out[rows] = np.take(self._segment(s)[name], idx[rows] - self._starts[s], axis=0)
        wide = _torch_dtype(spec.dtype)
        return torch.from_numpy(out if wide == spec.dtype else out.astype(wide))

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

    def _segment(self, s: int) -> dict[str, np.ndarray[Any, Any]]:
        maps = self._maps[s]
        if maps is None:
            files = self._manifest.segments[s].files
            # Plain ndarray views of the maps (the memmap subclass adds overhead to every index);
            # each view keeps its map alive, and nothing closes a map by hand.
            maps = {
                name: np.load(self.path / info.name, mmap_mode="r", allow_pickle=False).view(
                    np.ndarray
                )
                for name, info in files.items()
            }
            self._maps[s] = maps
        return maps

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
                windows[inside] = self._segment(s)[TOKENS_FIELD][local[:, None] + offsets]
        for k in np.flatnonzero(seg_first != seg_last).tolist():
            windows[k] = self._tokens(int(starts[k]), int(starts[k]) + seq_len + 1)
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


def open_splits(path: str | os.PathLike[str], verify: str = "sizes") -> dict[str, SegmentedDataset]:
    """Open the splits of a prepared directory: every sub-directory holding a ``manifest.json``.

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
    rank = {"train": 0, "val": 1, "test": 2}
    names = sorted(found, key=lambda n: (rank.get(n, 3), n))
    return {name: SegmentedDataset(root / name, verify=verify) for name in names}
