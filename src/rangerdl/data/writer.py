"""``SegmentWriter``: write a segmented dataset (format in ``manifest.py``).

The writer appends to one ``.npy`` per field and segment with ordinary file writes (numpy writes
the headers), so a full disk is an ``OSError`` (raised as ``DiskFullError`` naming the file),
never the SIGBUS a write into a sparse memory map becomes; it publishes each finished file with
tmp -> fsync -> rename; the manifest goes last and is the commit marker. Segment names carry a
random per-write token, so a rewrite never touches the files the old manifest names. One writer
per directory: a second one is refused (``rangerdl._lock.FolderLock``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rangerdl._fileio import atomic_write_text, disk_full_error, fsync_dir
from rangerdl._lock import FolderLock
from rangerdl.data.integrity import file_identity, record_verified
from rangerdl.data.manifest import (
    CHECKSUM_ALGORITHM,
    FORMAT,
    KINDS,
    MANIFEST_NAME,
    SEGMENT_FILE,
    VERSION,
    FieldSpec,
    FileInfo,
    Manifest,
    SegmentInfo,
    check_field_name,
    check_token_fields,
    num_samples_for,
    parse_dtype,
    parse_shape,
    read_npy_header,
)

__all__ = ["DEFAULT_SEGMENT_BYTES", "SegmentWriter"]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 512 << 20


@dataclass
class _OpenSegment:
    """The segment being filled: one open ``.npy.tmp`` file per field, hashed as it is written."""

    index: int
    capacity: int
    files: dict[str, BinaryIO]
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
        self._lock = FolderLock(self.out_dir, what="dataset directory")
        self._state = "new"  # new -> open -> closed | aborted

    @property
    def num_rows(self) -> int:
        """Rows (or tokens) appended so far."""
        current = self._current.num_rows if self._current else 0
        return sum(s.num_rows for s in self._segments) + current

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()  # a no-op once the manifest is committed
            raise

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
                chunk = values[offset : offset + take].data.cast("B")
                try:
                    seg.files[name].write(chunk)
                except OSError as exc:
                    raise disk_full_error(exc, seg.files[name].name, len(chunk)) from exc
                seg.hashes[name].update(chunk)
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
        record_verified(self.out_dir, self._written)
        self._lock.release()
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
        if self._current is not None:
            for fh in self._current.files.values():
                with contextlib.suppress(OSError):  # a full disk again; the file goes anyway
                    fh.close()
            self._current = None
        if self._token is not None:
            for path in self.out_dir.glob(f"seg-*-{self._token}.*"):
                if SEGMENT_FILE.match(path.name):
                    path.unlink(missing_ok=True)
        self._lock.release()
        self._state = "aborted"

    def _start(self) -> None:
        if self._state == "new":
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            self._token = secrets.token_hex(4)
            self._written: dict[str, tuple[tuple[int, ...], str]] = {}
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
        files: dict[str, BinaryIO] = {}
        self._current = _OpenSegment(index, self.rows_per_segment, files)
        for name, spec in self.fields.items():
            tmp = self.out_dir / (self._file_name(index, name) + ".tmp")
            # The header says a full segment; a short last segment gets its own in _finish_segment
            # (numpy pads headers for growth, so the data offset does not move).
            header = {
                "descr": np.lib.format.dtype_to_descr(spec.dtype),
                "fortran_order": False,
                "shape": (self.rows_per_segment, *spec.shape),
            }
            files[name] = fh = open(tmp, "wb")  # noqa: SIM115 (closed by _finish_segment/abort)
            try:
                np.lib.format.write_array_header_1_0(fh, header)
            except OSError as exc:
                raise disk_full_error(exc, tmp, 128) from exc
        self._current.hashes = {name: hashlib.sha256() for name in self.fields}
        return self._current

    def _finish_segment(self) -> None:
        seg = self._current
        assert seg is not None and seg.num_rows > 0
        files = {}
        for name, spec in self.fields.items():
            final = self.out_dir / self._file_name(seg.index, name)
            tmp = final.with_name(final.name + ".tmp")
            try:
                seg.files.pop(name).close()
                _shrink_npy(tmp, spec, seg.num_rows, seg.capacity)
            except OSError as exc:
                raise disk_full_error(exc, tmp, seg.num_rows * spec.sample_bytes) from exc
            os.replace(tmp, final)
            digest = seg.hashes[name].hexdigest()
            files[name] = FileInfo(final.name, final.stat().st_size, digest)
            self._written[final.name] = (file_identity(final), digest)
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
