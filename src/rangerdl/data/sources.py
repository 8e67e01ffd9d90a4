"""Built-in sources: ``prepare(KIND, out_dir, **options)`` writes a directory of splits.

Kinds (the same options as ``rangerdl data prepare KIND``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), a fixed
  stratified train/test split; ``x`` float32 ``(1, 8, 8)`` in [0, 1], ``y`` int64.
- ``text``: byte-level language modelling (vocab 256) over text files, windows of ``seq_len``;
  files (not windows) are assigned to train/val/test. Default source: the running interpreter's
  standard library sources (``Lib/**/*.py``, site-packages excluded).
- ``arrays``: features and labels from ``.npy``, ``.npz`` or ``.csv``; classification when the
  labels are integers or strings, else regression; a (stratified) test split.
- ``synthetic``: Gaussian class clusters of any size and shape, for memory and speed tests.

``out_dir`` receives ``train/``, ``test/`` (and ``val/`` for text), each a ``SegmentedDataset``.
The splits are built in a hidden sibling directory and renamed into place when all are done, so an
interrupted prepare leaves the previous result (or nothing) under ``out_dir``.
"""

from __future__ import annotations

import csv
import glob
import inspect
import logging
import os
import secrets
import shutil
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rangerdl.data.manifest import MANIFEST_NAME, fsync_dir
from rangerdl.data.segments import DEFAULT_SEGMENT_BYTES, SegmentWriter

__all__ = ["SOURCES", "prepare"]

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 32 << 20  # bytes of samples converted at a time while writing
_READ_BYTES = 16 << 20


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
    _check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    staging = out.parent / f".{out.name}.staging-{token}"
    try:
        builder(staging, segment_bytes=segment_bytes, **options)
        _swap_into_place(staging, out, token)
        logger.info(
            "prepared %s in %s: %s", kind, out, ", ".join(sorted(p.name for p in out.iterdir()))
        )
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


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


def _split_indices(
    labels: np.ndarray[Any, Any] | None, num: int, test_fraction: float, seed: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Sorted train and test row indices; stratified by ``labels`` when every class allows it."""
    _check_fraction("test_fraction", test_fraction)
    all_rows = np.arange(num)
    if test_fraction == 0:
        return all_rows, all_rows[:0]
    num_test = max(1, round(num * test_fraction))
    if num_test >= num:
        raise ValueError(f"test_fraction {test_fraction} of {num} samples leaves no training data")
    from sklearn.model_selection import train_test_split

    stratify = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2 and len(counts) <= min(num_test, num - num_test):
            stratify = labels
    train, test = train_test_split(
        all_rows, test_size=num_test, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(train), np.sort(test)


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _write_rows(
    out: Path,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    rows: np.ndarray[Any, Any],
    *,
    x_dtype: str,
    y_dtype: str,
    metadata: dict[str, Any],
    segment_bytes: int,
) -> None:
    """Write ``x[rows]``, ``y[rows]`` in chunks (``x`` may be a memmap larger than RAM)."""
    fields = {"x": (x_dtype, x.shape[1:]), "y": (y_dtype, y.shape[1:])}
    row_bytes = max(1, x[:1].nbytes + y[:1].nbytes)
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    with SegmentWriter(out, fields, segment_bytes=segment_bytes, metadata=metadata) as writer:
        for start in range(0, len(rows), chunk):
            take = rows[start : start + chunk]
            writer.append(x=np.asarray(x[take], dtype=x_dtype), y=np.asarray(y[take], y_dtype))


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
    train, test = _split_indices(y, len(y), test_fraction, seed)
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
            _write_rows(
                out / name,
                x,
                y,
                rows,
                x_dtype="float32",
                y_dtype="int64",
                metadata={**metadata, "split_name": name},
                segment_bytes=segment_bytes,
            )


def default_text_sources() -> tuple[Path, list[Path]]:
    """The running interpreter's standard library ``.py`` files (site-/dist-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not skip.intersection(p.relative_to(root).parts)
    ]
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    return root, files


def _text_sources(sources: Sequence[str | os.PathLike[str]]) -> tuple[Path, list[Path]]:
    files: dict[Path, None] = {}
    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            matched = [p for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            matched = [path]
        elif glob.has_magic(text):
            matched = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
        else:
            raise FileNotFoundError(f"text source {text} does not exist")
        if not matched:
            raise FileNotFoundError(f"text source {text} matches no files")
        files.update(dict.fromkeys(p.resolve() for p in matched))
    paths = list(files)
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return root, paths


def prepare_text(
    out: Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    sources: Sequence[str | os.PathLike[str]] | None = None,
    seq_len: int = 256,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> None:
    """Byte-level tokens (vocab 256) of text files, as windows of ``seq_len``; split by file.

    Files are ordered by path relative to their common directory; a permutation from ``seed``
    picks ``round(n * fraction)`` files (at least one when the fraction is positive) for val and
    test, so no file contributes to two splits. Each split is its files' bytes back to back.

    Args:
        out: directory to write ``train/``, ``val/``, ``test/`` into.
        segment_bytes: segment size bound.
        sources: files, directories (recursive) or glob patterns; None for the standard library.
        seq_len: tokens per sample (``x`` and ``y`` each hold ``seq_len``).
        val_fraction: fraction of files for validation.
        test_fraction: fraction of files for test.
        seed: file-assignment seed.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if sources is None:
        root, files = default_text_sources()
        description = f"python {sysconfig.get_python_version()} standard library {root}/**/*.py"
    else:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        root, files = _text_sources(sources)
        description = ", ".join(os.fspath(s) for s in sources)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    counts = {
        "val": 0 if val_fraction == 0 else max(1, round(len(files) * val_fraction)),
        "test": 0 if test_fraction == 0 else max(1, round(len(files) * test_fraction)),
    }
    if len(files) - counts["val"] - counts["test"] < 1:
        raise ValueError(
            f"{len(files)} file(s) cannot be split by file into train, val ({counts['val']}) and "
            f"test ({counts['test']}); give more files, or val_fraction=0 and test_fraction=0"
        )
    chosen = np.random.default_rng(seed).permutation(len(files))
    assignment = {
        "val": chosen[: counts["val"]],
        "test": chosen[counts["val"] : counts["val"] + counts["test"]],
        "train": chosen[counts["val"] + counts["test"] :],
    }
    for split in ("train", "val", "test"):
        split_files = [files[i] for i in sorted(assignment[split].tolist())]
        if not split_files:
            continue
        metadata = {
            "task": "lm",
            "vocab_size": 256,
            "seq_len": seq_len,
            "tokenizer": "bytes",
            "source": description,
            "num_files": len(split_files),
            "split": {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed},
            "split_name": split,
        }
        num_bytes = sum(p.stat().st_size for p in split_files)
        if num_bytes < seq_len + 1:
            raise ValueError(
                f"text split {split!r}: its {len(split_files)} file(s) hold {num_bytes} bytes, "
                f"fewer than seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more files"
            )
        with SegmentWriter(
            out / split,
            {"tokens": ("uint8", ())},
            kind="tokens",
            seq_len=seq_len,
            segment_bytes=segment_bytes,
            metadata=metadata,
        ) as writer:
            for data in _read_files(split_files):
                writer.append(tokens=np.frombuffer(data, np.uint8))


def _read_files(files: Sequence[Path]) -> Iterator[bytes]:
    for path in files:
        with open(path, "rb") as fh:
            while data := fh.read(_READ_BYTES):
                yield data


def _load_array(path: Path, role: str) -> np.ndarray[Any, Any]:
    """An array from ``.npy`` (memory-mapped) or ``.npz`` (one array, or key ``x``/``y``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            key = keys[0] if len(keys) == 1 else role if role in keys else None
            if key is None:
                raise ValueError(
                    f"{path}: holds arrays {keys}; expected one array, or one named {role!r}"
                )
            return np.asarray(archive[key])
    if suffix == ".csv":
        _, rows = _read_csv(path)
        return _numeric(rows, path)
    raise ValueError(f"{role} file {path}: expected .npy, .npz or .csv")


def _read_csv(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """A CSV's header (None when its first row is all numbers) and rows of strings."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header = None
    if not all(_is_number(cell) for cell in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    width = len(header) if header else len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"{path}: row {i + 1} has {len(row)} columns, expected {width}")
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return header, rows


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _numeric(rows: list[list[str]], path: Path) -> np.ndarray[Any, Any]:
    try:
        return np.array([[float(c) for c in row] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: non-numeric feature value ({exc})") from exc


def _labels_from_strings(cells: list[str]) -> tuple[np.ndarray[Any, Any], list[str] | None]:
    """Integer labels as int64, numbers as float64, else class indices with sorted class names."""
    stripped = [c.strip() for c in cells]
    try:
        return np.array([int(c) for c in stripped], dtype=np.int64), None
    except ValueError:
        pass
    try:
        return np.array([float(c) for c in stripped], dtype=np.float64), None
    except ValueError:
        pass
    names = sorted(set(stripped))
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[c] for c in stripped], dtype=np.int64), names


def prepare_arrays(
    out: Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    x: str | os.PathLike[str],
    y: str | os.PathLike[str] | None = None,
    label_column: str | int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    task: str | None = None,
) -> None:
    """User features and labels: ``x`` float32 as given per sample, ``y`` int64 or float32.

    Inputs: ``x`` and ``y`` as ``.npy`` (memory-mapped, may exceed RAM), ``.npz`` (one array each,
    or one archive with arrays ``x`` and ``y``) or ``.csv`` (numbers, optional header row); or one
    CSV ``x`` with ``label_column`` (a header name or a 0-based index). Labels that are integers
    or strings make a classification dataset (strings become classes in sorted order); floats a
    regression one. ``task`` overrides the guess.

    Args:
        out: directory to write ``train/`` and ``test/`` into.
        segment_bytes: segment size bound.
        x: features file.
        y: labels file (omit with ``label_column`` or an ``.npz`` holding ``x`` and ``y``).
        label_column: label column of a CSV ``x``.
        test_fraction: fraction of samples in the test split (stratified for classification).
        seed: split seed.
        task: ``"classification"`` or ``"regression"``; None guesses from the labels.
    """
    x_path = Path(x)
    class_names: list[str] | None = None
    if label_column is not None:
        if y is not None:
            raise ValueError("give either y or label_column, not both")
        if x_path.suffix.lower() != ".csv":
            raise ValueError(f"label_column needs a .csv x file, got {x_path}")
        if not x_path.is_file():
            raise FileNotFoundError(f"x file {x_path} does not exist")
        header, rows = _read_csv(x_path)
        column = _column_index(label_column, header, len(rows[0]), x_path)
        labels, class_names = _labels_from_strings([row[column] for row in rows])
        features = _numeric([row[:column] + row[column + 1 :] for row in rows], x_path)
    elif y is None:
        if x_path.suffix.lower() != ".npz":
            raise ValueError("y is required (or label_column for a CSV, or an .npz with x and y)")
        if not x_path.is_file():
            raise FileNotFoundError(f"x file {x_path} does not exist")
        with np.load(x_path, allow_pickle=False) as archive:
            if not {"x", "y"} <= set(archive.files):
                raise ValueError(f"{x_path}: holds {archive.files}; without y it needs 'x' and 'y'")
            features, labels = np.asarray(archive["x"]), np.asarray(archive["y"])
    else:
        features = _load_array(x_path, "x")
        y_path = Path(y)
        if y_path.suffix.lower() == ".csv":
            if not y_path.is_file():
                raise FileNotFoundError(f"y file {y_path} does not exist")
            header, rows = _read_csv(y_path)
            if len(rows[0]) != 1:
                raise ValueError(f"{y_path}: a labels CSV needs one column, found {len(rows[0])}")
            labels, class_names = _labels_from_strings([row[0] for row in rows])
        else:
            labels = np.asarray(_load_array(y_path, "y"))
    if features.ndim == 1:
        features = features.reshape(-1, 1)
    if len(features) != len(labels):
        raise ValueError(f"x has {len(features)} samples but y has {len(labels)}")
    if len(features) < 2:
        raise ValueError(f"x has {len(features)} sample(s); need at least 2")
    if task is None:
        task = "classification" if labels.dtype.kind in "biu" else "regression"
    metadata: dict[str, Any] = {"task": task, "input_shape": list(features.shape[1:])}
    if task == "classification":
        if labels.dtype.kind == "f" and not np.all(np.mod(labels, 1) == 0):
            raise ValueError("classification labels must be integers; got fractional values")
        if labels.ndim != 1:
            raise ValueError(f"classification labels must be 1-D, got shape {labels.shape}")
        labels = labels.astype(np.int64)
        if labels.min() < 0:
            raise ValueError(f"class labels must be >= 0, got {labels.min()}")
        num_classes = int(labels.max()) + 1
        metadata["num_classes"] = num_classes
        metadata["class_names"] = class_names or [str(c) for c in range(num_classes)]
        y_dtype = "int64"
    elif task == "regression":
        metadata["target_shape"] = list(labels.shape[1:])
        y_dtype = "float32"
    else:
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    metadata["source"] = f"arrays x={x_path}" + (f" y={y}" if y is not None else "")
    metadata["split"] = {"test_fraction": test_fraction, "seed": seed}
    stratify = labels if task == "classification" else None
    train, test = _split_indices(stratify, len(labels), test_fraction, seed)
    for name, rows_idx in (("train", train), ("test", test)):
        if len(rows_idx):
            _write_rows(
                out / name,
                features,
                labels,
                rows_idx,
                x_dtype="float32",
                y_dtype=y_dtype,
                metadata={**metadata, "split_name": name},
                segment_bytes=segment_bytes,
            )


def _column_index(column: str | int, header: list[str] | None, width: int, path: Path) -> int:
    if header is not None and str(column) in header:
        return header.index(str(column))
    if isinstance(column, int) or str(column).isdigit():
        index = int(column)
        if 0 <= index < width:
            return index
    names = f"columns {header}" if header else f"{width} columns (no header row)"
    raise ValueError(f"{path}: label_column {column!r} not found; it has {names}")


def prepare_synthetic(
    out: Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    samples: int,
    shape: Sequence[int] = (3, 32, 32),
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
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if dtype not in ("float32", "float16", "uint8"):
        raise ValueError(f"dtype must be float32, float16 or uint8, got {dtype!r}")
    shape = tuple(int(d) for d in shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"shape must be positive ints, got {shape}")
    _check_fraction("test_fraction", test_fraction)
    num_test = 0 if test_fraction == 0 else max(1, round(samples * test_fraction))
    if num_test >= samples:
        raise ValueError(
            f"test_fraction {test_fraction} of {samples} samples leaves no training data"
        )
    means = np.random.default_rng([seed, 0]).standard_normal((num_classes, *shape), np.float32)
    metadata = {
        "task": "classification",
        "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)],
        "input_shape": list(shape),
        "source": f"synthetic gaussian clusters, dtype {dtype}, seed {seed}",
    }
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    chunk = max(1, _CHUNK_BYTES // max(row_bytes, 4 * int(np.prod(shape))))
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
