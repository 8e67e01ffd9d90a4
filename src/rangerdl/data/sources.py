"""Built-in sources: ``prepare(KIND, out_dir, **options)`` writes a directory of splits.

Kinds (the same options as ``rangerdl data prepare KIND``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), a fixed
  stratified train/test split; ``x`` float32 ``(1, 8, 8)`` in [0, 1], ``y`` int64.
- ``text``: byte-level language modelling (vocab 256) over text files, windows of ``seq_len``;
  files (not windows) are assigned to train/val/test. Default source: the running interpreter's
  standard library sources (``Lib/**/*.py``, site-packages excluded).
- ``arrays``: features and labels from ``.npy``, ``.npz`` or ``.csv``; classification when the
  labels are integers or strings, else regression; a (stratified) test split; float tabular
  features standardised with the train split's statistics (kept in the metadata).
- ``synthetic``: Gaussian class clusters of any size and shape, for memory and speed tests.

``out_dir`` receives ``train/``, ``test/`` (and ``val/`` for text), each a ``SegmentedDataset``.
The splits are built in a hidden sibling directory (``.NAME.staging-PID-TOKEN``) and renamed into
place when all are done, so an interrupted prepare leaves the previous result (or nothing) under
``out_dir``. One prepare per ``out_dir`` at a time: it holds ``.NAME.lock`` (an OS lock, released
when the process dies), refuses a second one naming the holder's PID, and removes the staging
folders that killed prepares left behind. Each source checks the free space for what it will write
before writing; a disk that fills up anyway is a ``DiskFullError`` naming the file, with this
write's files removed.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rangerdl._fileio import DiskFullError, check_free_space, fsync_dir
from rangerdl._lock import FolderLock, pid_alive
from rangerdl.data.arrays import prepare_arrays
from rangerdl.data.manifest import MANIFEST_NAME, parse_shape
from rangerdl.data.splits import (
    CHUNK_BYTES,
    HEADROOM_BYTES,
    check_fraction,
    check_positive_int,
    split_indices,
    write_rows,
)
from rangerdl.data.text import prepare_text
from rangerdl.data.writer import DEFAULT_SEGMENT_BYTES, SegmentWriter

__all__ = [
    "SOURCES",
    "prepare",
    "prepare_arrays",
    "prepare_digits",
    "prepare_synthetic",
    "prepare_text",
]

logger = logging.getLogger(__name__)


def prepare(
    kind: str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    **options: Any,
) -> Path:
    """Build the splits of source ``kind`` in ``out_dir``; returns ``out_dir``.

    Args:
        kind: ``"digits"``, ``"text"``, ``"arrays"`` or ``"synthetic"``.
        out_dir: directory to create; an existing prepared directory is replaced only with
            ``overwrite``, any other non-empty directory is refused.
        overwrite: replace an existing prepared directory.
        segment_bytes: segment size bound passed to ``SegmentWriter``.
        **options: the source's options (see ``prepare_digits``, ``prepare_text``,
            ``prepare_arrays``, ``prepare_synthetic``).

    Raises:
        ValueError: unknown kind or option, bad option value, or ``out_dir`` not replaceable.
        FileNotFoundError: an input file is missing.
    """
    builder = SOURCES.get(kind)
    if builder is None:
        raise ValueError(f"unknown source {kind!r}; choose one of {sorted(SOURCES)}")
    accepted = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name != "segment_bytes"
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"source {kind!r} has no option(s) {unknown}; it accepts {accepted}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, what="dataset folder"):
        _clean_stale(out)
        _check_out_dir(out, overwrite)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        staging = out.parent / f".{out.name}.staging-{token}"
        try:
            try:
                builder(staging, segment_bytes=segment_bytes, **options)
            except DiskFullError as exc:
                raise DiskFullError(
                    exc.errno,
                    f"{exc}; nothing was written to {out} (its staging folder is removed)",
                ) from exc
            _swap_into_place(staging, out, token)
            logger.info(
                "prepared %s in %s: %s", kind, out, ", ".join(sorted(p.name for p in out.iterdir()))
            )
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return out


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<what>staging|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")


def _clean_stale(out: Path) -> None:
    """Remove ``.NAME.staging-*`` / ``.NAME.old-*`` left by prepares that died (the caller holds
    the folder's lock, so no live prepare of this version owns one). If a prepare died between its
    two renames, ``out`` is missing and its ``.old-*`` holds the previous dataset: restore it."""
    pattern = str(out.parent / f".{glob.escape(out.name)}.*-*")
    for entry in sorted(glob.glob(pattern)):
        path = Path(entry)
        match = _STALE.match(path.name)
        if match is None or match["name"] != out.name or not path.is_dir():
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            logger.warning("keeping %s: its process %d is still running", path, pid)
            continue
        if (
            match["what"] == "old"
            and not out.exists()
            and (path / "train" / MANIFEST_NAME).is_file()
        ):
            os.rename(path, out)
            fsync_dir(out.parent)
            logger.warning("restored %s from %s (a prepare died while replacing it)", out, path)
            continue
        logger.warning("removing %s, left by an interrupted prepare", path)
        shutil.rmtree(path, ignore_errors=True)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if (out / "train" / MANIFEST_NAME).is_file():
        if not overwrite:
            raise ValueError(
                f"{out} already holds a prepared dataset; pass overwrite=True (--overwrite) to "
                "replace it"
            )
    elif any(out.iterdir()):
        raise ValueError(
            f"{out} exists, is not empty and holds no prepared dataset (no train/{MANIFEST_NAME}); "
            "refusing to write into it"
        )


def _swap_into_place(staging: Path, out: Path, token: str) -> None:
    """Rename ``staging`` to ``out``; a crash in between leaves the old ``out`` or none."""
    old = out.parent / f".{out.name}.old-{token}"
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def prepare_digits(
    out: Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> None:
    """scikit-learn's bundled digits: ``x`` float32 ``(1, 8, 8)`` scaled to [0, 1], ``y`` int64.

    Args:
        out: directory to write ``train/`` and ``test/`` into.
        segment_bytes: segment size bound.
        test_fraction: fraction of samples in the (stratified) test split.
        seed: split seed; the defaults give the same split on every machine.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    check_free_space(out, x.nbytes + y.nbytes + HEADROOM_BYTES, "the digits dataset")
    train, test = split_indices(y, len(y), test_fraction, seed)
    metadata = {
        "task": "classification",
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
        "input_shape": [1, 8, 8],
        "source": "digits (sklearn.datasets.load_digits, 8x8 grey levels 0..16 / 16)",
        "split": {"test_fraction": test_fraction, "seed": seed, "stratified": True},
    }
    for name, rows in (("train", train), ("test", test)):
        if len(rows):
            write_rows(
                out / name,
                x,
                y,
                rows,
                x_dtype="float32",
                y_dtype="int64",
                metadata={**metadata, "split_name": name},
                segment_bytes=segment_bytes,
            )


def prepare_synthetic(
    out: Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    samples: int,
    shape: Sequence[int] | int = (3, 32, 32),
    num_classes: int = 10,
    dtype: str = "float32",
    test_fraction: float = 0.1,
    seed: int = 0,
) -> None:
    """Gaussian clusters: ``x = mean[y] + N(0, 1)``, ``y`` uniform over ``num_classes``.

    Generated and written chunk by chunk, so any size fits in bounded memory. ``uint8`` stores
    ``clip(128 + 32 x)`` (a quarter of float32's bytes; the reader returns it as int64).

    Args:
        out: directory to write ``train/`` and ``test/`` into.
        segment_bytes: segment size bound.
        samples: total samples over both splits.
        shape: per-sample shape of ``x``.
        num_classes: number of classes.
        dtype: ``"float32"``, ``"float16"`` or ``"uint8"``.
        test_fraction: fraction of ``samples`` in the test split.
        seed: generator seed.
    """
    check_positive_int("samples", samples)
    check_positive_int("num_classes", num_classes)
    if dtype not in ("float32", "float16", "uint8"):
        raise ValueError(f"dtype must be float32, float16 or uint8, got {dtype!r}")
    shape = parse_shape(shape, "synthetic shape")
    check_fraction("test_fraction", test_fraction)
    num_test = 0 if test_fraction == 0 else max(1, round(samples * test_fraction))
    if num_test >= samples:
        raise ValueError(
            f"test_fraction {test_fraction} of {samples} samples leaves no training data"
        )
    if num_classes > samples:
        raise ValueError(
            f"num_classes {num_classes} is more than samples {samples}: every class needs a sample"
        )
    x_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    check_free_space(out, samples * (x_bytes + 8) + HEADROOM_BYTES, f"{samples} synthetic samples")
    means = np.random.default_rng([seed, 0]).standard_normal((num_classes, *shape), np.float32)
    metadata = {
        "task": "classification",
        "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)],
        "input_shape": list(shape),
        "source": f"synthetic gaussian clusters, dtype {dtype}, seed {seed}",
    }
    chunk = max(1, CHUNK_BYTES // (4 * int(np.prod(shape))))  # generated as float32
    for stream, (name, count) in enumerate((("train", samples - num_test), ("test", num_test))):
        if count == 0:
            continue
        rng = np.random.default_rng([seed, 1 + stream])
        fields = {"x": (dtype, shape), "y": ("int64", ())}
        with SegmentWriter(
            out / name,
            fields,
            segment_bytes=segment_bytes,
            metadata={**metadata, "split_name": name},
        ) as writer:
            for start in range(0, count, chunk):
                n = min(chunk, count - start)
                labels = rng.integers(num_classes, size=n)
                values = rng.standard_normal((n, *shape), np.float32)
                values += means[labels]
                if dtype == "uint8":
                    values = np.clip(values * 32 + 128, 0, 255)
                writer.append(x=values.astype(dtype), y=labels)


SOURCES: dict[str, Callable[..., None]] = {
    "digits": prepare_digits,
    "text": prepare_text,
    "arrays": prepare_arrays,
    "synthetic": prepare_synthetic,
}
