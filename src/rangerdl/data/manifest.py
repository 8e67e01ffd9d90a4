"""The on-disk format of a segmented dataset: ``manifest.json`` plus one ``.npy`` file per segment and field.

A dataset is a directory::

    manifest.json                      # the commit marker, written last
    seg-00000-1f2e3d4c.x.npy           # segment 0, field "x" (numpy owns the header)
    seg-00000-1f2e3d4c.y.npy
    seg-00001-1f2e3d4c.x.npy
    ...

``manifest.json`` (format ``rangerdl-segments``, version 1)::

    {"format": "rangerdl-segments", "version": 1,
     "kind": "rows" | "tokens", "seq_len": null | L,
     "fields": {"x": {"dtype": "float32", "shape": [1, 8, 8]}, "y": {"dtype": "int64", "shape": []}},
     "num_rows": 1437,        # rows (kind rows) or tokens (kind tokens), over all segments
     "num_samples": 1437,     # rows, or (num_rows - 1) // seq_len token windows
     "checksum_algorithm": "sha256",
     "segments": [{"num_rows": 1437,
                   "files": {"x": {"name": "seg-00000-1f2e3d4c.x.npy", "bytes": 368128,
                                   "sha256": "<hex of the array data, header excluded>"}, ...}}],
     "metadata": {...}}       # free-form, JSON only

The middle part of a segment's file name is a random token per write, so a rewrite of a directory
never touches the files the old manifest names: a crash leaves the old dataset (or none) intact.
This module reads and checks manifests; the writer is ``writer.py``, the reader ``dataset.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
"""The usual split names, in the order they are listed (others follow, by name)."""


def split_order(name: str) -> tuple[int, str]:
    """Sort key for split names: train, val, test, then any other by name."""
    return (SPLITS.index(name) if name in SPLITS else len(SPLITS), name)


__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "SPLITS",
    "VERSION",
    "FieldSpec",
    "FileInfo",
    "Manifest",
    "SegmentInfo",
    "split_order",
]

FORMAT = "rangerdl-segments"
VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "sha256"
KINDS = ("rows", "tokens")
TOKENS_FIELD = "tokens"
# dtypes a field may have; uint64 is left out because it cannot be widened to int64 losslessly.
ALLOWED_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "float16",
    "float32",
    "float64",
)
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names the reader adds to items; a field may not take them.
RESERVED_FIELDS = ("mask",)
SEGMENT_FILE = re.compile(r"^seg-\d{5,}-[0-9a-f]{8}\.[A-Za-z_][A-Za-z0-9_]*\.npy(\.tmp)?$")
_HASH_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class FieldSpec:
    """One field of a sample: its dtype and per-sample shape (``()`` for a scalar)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample of this field."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class FileInfo:
    """One ``.npy`` file of a segment as the manifest records it."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SegmentInfo:
    """One segment: its row count and one file per field."""

    num_rows: int
    files: dict[str, FileInfo]


def check_field_name(name: str) -> None:
    """Raise ValueError unless ``name`` can be a field (it becomes part of a file name)."""
    if not _FIELD_NAME.match(name):
        raise ValueError(f"field name {name!r} must match {_FIELD_NAME.pattern}")
    if name in RESERVED_FIELDS:
        raise ValueError(f"field name {name!r} is reserved (collate adds it to padded batches)")


def parse_dtype(value: Any, where: str) -> np.dtype[Any]:
    """The numpy dtype for ``value`` (``"float32"``, ``np.float32``, ...), or ValueError naming ``where``."""
    try:
        dtype = np.dtype(value)
    except TypeError as exc:
        raise ValueError(f"{where}: {value!r} is not a numpy dtype") from exc
    if dtype.name not in ALLOWED_DTYPES:
        raise ValueError(
            f"{where}: dtype {dtype.name} is not supported; use one of {ALLOWED_DTYPES}"
        )
    return dtype


def parse_shape(value: Any, where: str) -> tuple[int, ...]:
    """A per-sample shape as a tuple of positive ints, or ValueError naming ``where``."""
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value
    ):
        raise ValueError(f"{where}: shape must be a list of positive ints, got {value!r}")
    return tuple(int(d) for d in value)


def num_samples_for(kind: str, num_rows: int, seq_len: int | None) -> int:
    """Samples in a dataset of ``num_rows`` rows (kind rows) or tokens (kind tokens)."""
    if kind == "rows":
        return num_rows
    assert seq_len is not None
    return max(0, (num_rows - 1) // seq_len)


@dataclass(frozen=True)
class Manifest:
    """A parsed, schema-checked ``manifest.json``; ``raw`` is the JSON object as read."""

    kind: str
    seq_len: int | None
    fields: dict[str, FieldSpec]
    segments: list[SegmentInfo]
    num_rows: int
    num_samples: int
    metadata: dict[str, Any]
    raw: dict[str, Any]

    @property
    def checksum(self) -> str:
        """sha256 of the manifest's content without file names: identical data gives identical sums."""
        return content_checksum(self.raw)

    @property
    def nbytes(self) -> int:
        """Bytes of all segment files."""
        return sum(f.bytes for s in self.segments for f in s.files.values())

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read and schema-check ``directory/manifest.json`` (the files are checked by ``verify``)."""
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"dataset directory {directory} does not exist")
        if not path.is_file():
            splits = sorted(p.name for p in directory.iterdir() if (p / MANIFEST_NAME).is_file())
            hint = (
                f"; it holds the splits {splits}: open one of them, or all with open_splits"
                if splits
                else ""
            )
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a rangerdl dataset, or its write did not "
                f"finish (the manifest is written last){hint}"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(raw, str(path))

    @classmethod
    def from_json(cls, raw: Any, where: str) -> Manifest:
        """Check a manifest object against the schema; errors name ``where`` and the key."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise ValueError(f"{where}: 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise ValueError(
                f"{where}: 'version' is {raw.get('version')!r}; this rangerdl reads version {VERSION}"
            )
        kind = _get(raw, "kind", str, where)
        if kind not in KINDS:
            raise ValueError(f"{where}: 'kind' is {kind!r}, expected one of {KINDS}")
        seq_len = raw.get("seq_len")
        if kind == "tokens":
            if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
                raise ValueError(f"{where}: 'seq_len' must be a positive int for kind 'tokens'")
        elif seq_len is not None:
            raise ValueError(f"{where}: 'seq_len' must be null for kind 'rows'")
        raw_fields = _get(raw, "fields", dict, where)
        if not raw_fields:
            raise ValueError(f"{where}: 'fields' is empty")
        fields: dict[str, FieldSpec] = {}
        for name, spec in raw_fields.items():
            check_field_name(name)
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: fields.{name} must be an object")
            dtype = parse_dtype(spec.get("dtype"), f"{where}: fields.{name}.dtype")
            shape = parse_shape(spec.get("shape"), f"{where}: fields.{name}.shape")
            fields[name] = FieldSpec(name, dtype, shape)
        if kind == "tokens":
            check_token_fields(fields, where)
        segments = [
            _parse_segment(s, fields, f"{where}: segments[{i}]")
            for i, s in enumerate(_get(raw, "segments", list, where))
        ]
        num_rows = sum(s.num_rows for s in segments)
        if _get(raw, "num_rows", int, where) != num_rows:
            raise ValueError(
                f"{where}: 'num_rows' is {raw['num_rows']}, but the segments hold {num_rows}"
            )
        num_samples = num_samples_for(kind, num_rows, seq_len)
        if _get(raw, "num_samples", int, where) != num_samples:
            raise ValueError(
                f"{where}: 'num_samples' is {raw['num_samples']}, but {num_rows} "
                f"{'rows' if kind == 'rows' else 'tokens'} give {num_samples}"
            )
        if raw.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
            raise ValueError(f"{where}: 'checksum_algorithm' must be {CHECKSUM_ALGORITHM!r}")
        metadata = _get(raw, "metadata", dict, where)
        return cls(kind, seq_len, fields, segments, num_rows, num_samples, metadata, raw)

    def verify(self, directory: Path, checksum: bool = False) -> None:
        """Check every file against the manifest: present, size, dtype, shape; data sha256 if asked.

        Raises:
            FileNotFoundError: a segment file is missing.
            ValueError: a file is truncated or extended, has another dtype or shape, or (with
                ``checksum``) other data than was written; the message names the file.
        """
        for segment in self.segments:
            for name, info in segment.files.items():
                spec = self.fields[name]
                verify_file(directory / info.name, info, spec, segment.num_rows, checksum)


def check_token_fields(fields: dict[str, FieldSpec], where: str) -> None:
    """A token dataset has one scalar integer field named ``tokens``."""
    spec = fields.get(TOKENS_FIELD)
    if list(fields) != [TOKENS_FIELD] or spec is None:
        raise ValueError(f"{where}: kind 'tokens' needs exactly one field named {TOKENS_FIELD!r}")
    if spec.shape != () or spec.dtype.kind not in "iu":
        raise ValueError(f"{where}: field 'tokens' must be a scalar integer, got {spec.to_json()}")


def _get(raw: dict[str, Any], key: str, typ: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{where}: key {key!r} must be a {typ.__name__}, got {value!r}")
    return value


def _parse_segment(raw: Any, fields: dict[str, FieldSpec], where: str) -> SegmentInfo:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    num_rows = _get(raw, "num_rows", int, where)
    if num_rows < 1:
        raise ValueError(f"{where}: 'num_rows' must be >= 1, got {num_rows}")
    raw_files = _get(raw, "files", dict, where)
    if set(raw_files) != set(fields):
        raise ValueError(
            f"{where}: files for fields {sorted(raw_files)}, expected {sorted(fields)}"
        )
    files: dict[str, FileInfo] = {}
    for name, f in raw_files.items():
        w = f"{where}.files.{name}"
        if not isinstance(f, dict):
            raise ValueError(f"{w}: expected an object")
        file_name = _get(f, "name", str, w)
        if "/" in file_name or "\\" in file_name or not SEGMENT_FILE.match(file_name):
            raise ValueError(f"{w}: {file_name!r} is not a segment file name")
        files[name] = FileInfo(file_name, _get(f, "bytes", int, w), _get(f, "sha256", str, w))
    return SegmentInfo(num_rows, files)


def content_checksum(raw: dict[str, Any]) -> str:
    """sha256 over the manifest with file names left out (they carry a random per-write token)."""
    content = {k: v for k, v in raw.items() if k != "segments"}
    content["segments"] = [
        [s["num_rows"], {name: f["sha256"] for name, f in sorted(s["files"].items())}]
        for s in raw["segments"]
    ]
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def read_npy_header(path: Path) -> tuple[np.dtype[Any], tuple[int, ...], bool, int]:
    """``(dtype, shape, fortran_order, header_bytes)`` of an ``.npy`` file, read by numpy."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as exc:
            raise ValueError(f"{path}: not a readable .npy file ({exc})") from exc
        return dtype, tuple(shape), bool(fortran), fh.tell()


def verify_file(path: Path, info: FileInfo, spec: FieldSpec, num_rows: int, checksum: bool) -> int:
    """Check one segment file against its manifest entry (see ``Manifest.verify``); returns the
    length of its ``.npy`` header (where the data starts)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: segment file is missing (named by the manifest)")
    size = path.stat().st_size
    if size != info.bytes:
        what = "truncated" if size < info.bytes else "longer than written"
        raise ValueError(f"{path}: {what}: {size} bytes, the manifest says {info.bytes}")
    dtype, shape, fortran, header = read_npy_header(path)
    expected_shape = (num_rows, *spec.shape)
    if dtype != spec.dtype:
        raise ValueError(f"{path}: dtype {dtype}, the manifest says {spec.dtype.name}")
    if shape != expected_shape or fortran:
        raise ValueError(
            f"{path}: shape {shape}{' (Fortran order)' if fortran else ''}, the manifest says "
            f"{expected_shape} (C order)"
        )
    data_bytes = num_rows * spec.sample_bytes
    if header + data_bytes != size:
        raise ValueError(
            f"{path}: {size} bytes, but a header of {header} and {expected_shape} {dtype} data "
            f"need {header + data_bytes}"
        )
    if checksum:
        digest = sha256_file(path, header)
        if digest != info.sha256:
            raise ValueError(
                f"{path}: sha256 of the data is {digest}, the manifest says {info.sha256}: "
                "the file changed after it was written"
            )
    return header


def sha256_file(path: Path, offset: int) -> str:
    """sha256 of a file's bytes from ``offset`` on, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
