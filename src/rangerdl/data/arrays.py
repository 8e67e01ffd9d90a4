"""The ``arrays`` source: user features and labels from ``.npy``, ``.npz`` or ``.csv``.

Input is untrusted: every problem with a file (unreadable, truncated, not UTF-8, wrong dtype,
NaN or inf, a label far above the number of classes) is a ``ValueError`` naming the file (and the
row and column where there is one).
"""

from __future__ import annotations

import csv
import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rangerdl._fileio import check_free_space
from rangerdl.data.splits import CHUNK_BYTES, HEADROOM_BYTES, split_indices, write_rows
from rangerdl.data.writer import DEFAULT_SEGMENT_BYTES

__all__ = ["MAX_CLASSES_PER_LABEL", "prepare_arrays"]

logger = logging.getLogger(__name__)

# Integer labels are class indices 0..K-1: K = max + 1 may exceed the distinct labels present
# (classes missing from a subset) by this factor, or be up to MIN_CLASSES_CAP, before it is
# taken for a mistake (an id, a hash) that would give a model K outputs.
MAX_CLASSES_PER_LABEL = 10
MIN_CLASSES_CAP = 1000


@dataclass
class _Origin:
    """Where the samples came from, for messages: the files and, for a CSV, line numbers."""

    x: Path
    y: Path
    lines: list[int] | None = None  # CSV line of each sample
    columns: list[int] | None = None  # CSV column of each feature
    header: list[str] | None = None

    def row(self, i: int) -> str:
        return f"row {i}" + (f" (line {self.lines[i]})" if self.lines else "")

    def column(self, k: int, shape: tuple[int, ...]) -> str:
        if self.columns is not None:
            c = self.columns[k]
            name = f" {self.header[c]!r}" if self.header else ""
            return f"column {c}{name}"
        if len(shape) <= 1:
            return f"column {k}"
        return f"position {tuple(int(v) for v in np.unravel_index(k, shape))}"


def _load_array(path: Path, role: str) -> np.ndarray[Any, Any]:
    """An array from ``.npy`` (memory-mapped) or ``.npz`` (one array, or key ``x``/``y``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        _, rows, _ = _read_csv(path)
        return _numeric(rows, path)
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"{role} file {path}: expected .npy, .npz or .csv")
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            key = keys[0] if len(keys) == 1 else role if role in keys else None
            if key is None:
                raise ValueError(f"holds arrays {keys}; expected one array, or one named {role!r}")
            return np.asarray(archive[key])
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "mmap length" in reason or "size" in reason:
            reason = f"empty or truncated ({reason})"
        raise ValueError(f"{path}: not a readable {suffix} file: {reason}") from exc


def _read_csv(path: Path) -> tuple[list[str] | None, list[list[str]], list[int]]:
    """A CSV's header (None when its first row is all numbers), rows of strings, and the line
    number of each row."""
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(reader.line_num)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason}: byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header = None
    if not all(_is_number(cell) for cell in rows[0]):
        header, rows, lines = [c.strip() for c in rows[0]], rows[1:], lines[1:]
    width = len(header) if header else len(rows[0]) if rows else 0
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"{path}: line {lines[i]} has {len(row)} columns, expected {width}")
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return header, rows, lines


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _numeric(
    rows: list[list[str]], path: Path, lines: list[int] | None = None
) -> np.ndarray[Any, Any]:
    try:
        return np.array([[float(c) for c in row] for row in rows], dtype=np.float64)
    except ValueError:
        pass
    for i, row in enumerate(rows):
        for c, cell in enumerate(row):
            if not _is_number(cell):
                where = f"line {lines[i]}" if lines else f"row {i}"
                raise ValueError(f"{path}: {where}, column {c}: {cell!r} is not a number")
    raise AssertionError("unreachable")


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
    drop_nonfinite: bool = False,
    standardize: bool | None = None,
) -> None:
    """User features and labels: ``x`` float32 as given per sample, ``y`` int64 or float32.

    Inputs: ``x`` and ``y`` as ``.npy`` (memory-mapped, may exceed RAM), ``.npz`` (one array each,
    or one archive with arrays ``x`` and ``y``) or ``.csv`` (numbers, optional header row); or one
    CSV ``x`` with ``label_column`` (a header name or a 0-based index). Labels that are integers
    or strings make a classification dataset (strings become classes in sorted order); floats a
    regression one. ``task`` overrides the guess. Integer labels are class indices: ``num_classes``
    is the largest label + 1, refused when it is far above the number of distinct labels
    (``MAX_CLASSES_PER_LABEL``). NaN and inf, in the input or after the cast to float32, are
    refused with the file, row and column, unless ``drop_nonfinite``.

    Standardisation: each feature (each position of a sample) becomes ``(x - mean) / std``, with
    ``mean`` and ``std`` (float64, ``ddof=0``; 1 for a feature constant on train) computed over
    the train split only, after the split and after dropping non-finite rows, and applied to every
    split. They are stored in every split's metadata as ``standardize = {"mean": [...], "std":
    [...]}`` (nested in the sample shape) so new data can get the same transform; the stored
    features are already standardised, so training and ``rangerdl eval`` need nothing more.
    ``standardize=None`` (the default) standardises floating-point features (a CSV's always are)
    whose samples are vectors, i.e. tables; it leaves integer features (counts, ids, ``uint8``
    pixels) and samples of more dimensions (images, sequences: usually normalised per channel)
    as given, with ``standardize`` None in the metadata. True and False force it on or off.
    Regression targets are never scaled: losses and metrics stay in the target's units.

    Args:
        out: directory to write ``train/`` and ``test/`` into.
        segment_bytes: segment size bound.
        x: features file.
        y: labels file (omit with ``label_column`` or an ``.npz`` holding ``x`` and ``y``).
        label_column: label column of a CSV ``x``.
        test_fraction: fraction of samples in the test split (stratified for classification).
        seed: split seed.
        task: ``"classification"`` or ``"regression"``; None guesses from the labels.
        drop_nonfinite: drop the samples holding NaN or inf (their count is logged and kept in
            the metadata as ``dropped_nonfinite_rows``) instead of refusing them.
        standardize: standardise the features with the train split's statistics; None decides
            by dtype and shape as above.
    """
    x_path = Path(x)
    features, labels, class_names, origin = _read_arrays(x_path, y, label_column)
    keep = _finite_rows(features, labels, origin, drop_nonfinite)
    kept = np.arange(len(labels)) if keep is None else np.flatnonzero(keep)
    if len(kept) < 2:
        raise ValueError(
            f"{x_path}: {len(kept)} sample(s) left without NaN or inf; need at least 2"
        )
    labels_kept = labels if keep is None else labels[kept]
    labels_kept, metadata, y_dtype = _labels_for_task(labels_kept, class_names, task, origin.y)
    metadata["input_shape"] = list(features.shape[1:])
    metadata["source"] = f"arrays x={x_path}" + (f" y={y}" if y is not None else "")
    metadata["split"] = {"test_fraction": test_fraction, "seed": seed}
    if drop_nonfinite:
        metadata["dropped_nonfinite_rows"] = int(len(labels) - len(kept))
        if len(kept) < len(labels):
            logger.warning(
                "dropped %d of %d samples holding NaN or inf", len(labels) - len(kept), len(labels)
            )
    sample_bytes = 4 * int(np.prod(features.shape[1:])) + 8 * int(np.prod(labels.shape[1:]))
    check_free_space(out, len(kept) * sample_bytes + HEADROOM_BYTES, f"{len(kept)} samples")
    if keep is not None or labels_kept is not labels:
        labels_full = np.zeros(len(labels), labels_kept.dtype)
        labels_full[kept] = labels_kept
        labels = labels_full
    stratify = labels_kept if metadata["task"] == "classification" else None
    train, test = split_indices(stratify, len(kept), test_fraction, seed)
    x_map = None
    if _should_standardize(standardize, features):
        mean, std = _train_statistics(features, kept[train])
        metadata["standardize"] = {"mean": mean.tolist(), "std": std.tolist()}
        x_map = _standardizer(mean, std, origin.x)
    else:
        metadata["standardize"] = None
    for name, rows in (("train", kept[train]), ("test", kept[test])):
        if len(rows):
            write_rows(
                out / name,
                features,
                labels,
                rows,
                x_dtype="float32",
                y_dtype=y_dtype,
                metadata={**metadata, "split_name": name},
                segment_bytes=segment_bytes,
                x_map=x_map,
            )


def _should_standardize(standardize: bool | None, features: np.ndarray[Any, Any]) -> bool:
    """The choice given, or by default: floating-point features with one vector per sample."""
    if standardize is not None:
        if not isinstance(standardize, bool):
            raise ValueError(f"standardize must be True, False or None, got {standardize!r}")
        return standardize
    if features.dtype.kind != "f":
        logger.info(
            "features are %s: stored as given (pass --standardize to standardise them)",
            features.dtype,
        )
        return False
    if features.ndim != 2:
        logger.info(
            "samples have shape %s, not vectors: stored as given (pass --standardize to "
            "standardise each position)",
            tuple(features.shape[1:]),
        )
        return False
    return True


def _train_statistics(
    features: np.ndarray[Any, Any], rows: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Per-feature float64 mean and std (``ddof=0``) of ``features[rows]``, read in chunks
    (``features`` may be a memmap larger than RAM); a feature constant up to rounding gets std 1."""
    shape = features.shape[1:]
    chunk_rows = max(1, CHUNK_BYTES // max(1, 8 * int(np.prod(shape))))
    count = 0
    mean = np.zeros(shape, np.float64)
    m2 = np.zeros(shape, np.float64)  # sum of squared deviations from the mean
    for start in range(0, len(rows), chunk_rows):
        block = np.asarray(features[rows[start : start + chunk_rows]], dtype=np.float64)
        # Chan et al.'s pairwise update: stable without a second pass over the file.
        block_mean = block.mean(axis=0)
        block_m2 = np.square(block - block_mean).sum(axis=0)
        total = count + len(block)
        delta = block_mean - mean
        mean = mean + delta * (len(block) / total)
        m2 = m2 + block_m2 + np.square(delta) * (count * len(block) / total)
        count = total
    std = np.sqrt(m2 / count)
    std[std <= 10 * np.finfo(np.float64).eps * np.abs(mean)] = 1.0
    return mean, std


def _standardizer(
    mean: np.ndarray[Any, Any], std: np.ndarray[Any, Any], path: Path
) -> Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    def standardize(block: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        with np.errstate(over="ignore"):
            z = ((np.asarray(block, np.float64) - mean) / std).astype(np.float32)
        if not np.isfinite(z).all():
            raise ValueError(
                f"{path}: a feature standardised with the train split's mean and std does not "
                "fit float32 (a feature nearly constant on train, far off elsewhere); pass "
                "--no-standardize"
            )
        return z

    return standardize


def _finite_rows(
    features: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    origin: _Origin,
    drop: bool,
) -> np.ndarray[Any, Any] | None:
    """None when every value is finite as float32; else (with ``drop``) a mask of the rows to
    keep; without ``drop`` a ValueError naming the first bad value."""
    keep: np.ndarray[Any, Any] | None = None
    for path, array in ((origin.x, features), (origin.y, labels)):
        if array.dtype.kind != "f":
            continue
        shape = array.shape[1:]
        chunk_rows = max(1, CHUNK_BYTES // max(1, 4 * int(np.prod(shape))))
        for start in range(0, len(array), chunk_rows):
            raw = np.asarray(array[start : start + chunk_rows])
            with np.errstate(over="ignore", invalid="ignore"):
                cast = raw.astype(np.float32).reshape(len(raw), -1)
            bad = ~np.isfinite(cast)
            if not bad.any():
                continue
            bad_rows = bad.any(axis=1)
            if drop:
                if keep is None:
                    keep = np.ones(len(array), bool)
                keep[start : start + len(raw)] &= ~bad_rows
                continue
            r = int(np.flatnonzero(bad_rows)[0])
            k = int(np.flatnonzero(bad[r])[0])
            value = raw.reshape(len(raw), -1)[r, k]
            what = (
                f"{float(value)!r} does not fit float32"
                if np.isfinite(value)
                else f"holds {float(value)}"
            )
            column = (
                origin.column(k, shape)
                if path == origin.x
                else (f"column {k}" if shape else "the label")
            )
            raise ValueError(
                f"{path}: {origin.row(start + r)}, {column}: {what}; NaN and inf are refused "
                "(fix the input, or pass --drop-nonfinite to drop such rows)"
            )
    return keep


def _read_arrays(
    x_path: Path, y: str | os.PathLike[str] | None, label_column: str | int | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str] | None, _Origin]:
    """Features (2-D at least), labels, for string labels the class names, and the origin."""
    class_names: list[str] | None = None
    origin = _Origin(x_path, x_path)
    if label_column is not None:
        if y is not None:
            raise ValueError("give either y or label_column, not both")
        if x_path.suffix.lower() != ".csv":
            raise ValueError(f"label_column needs a .csv x file, got {x_path}")
        if not x_path.is_file():
            raise FileNotFoundError(f"x file {x_path} does not exist")
        header, rows, lines = _read_csv(x_path)
        column = _column_index(label_column, header, len(rows[0]), x_path)
        labels, class_names = _labels_from_strings([row[column] for row in rows])
        features = _numeric([row[:column] + row[column + 1 :] for row in rows], x_path, lines)
        columns = [c for c in range(len(rows[0])) if c != column]
        origin = _Origin(x_path, x_path, lines, columns, header)
    elif y is None:
        if x_path.suffix.lower() != ".npz":
            raise ValueError("y is required (or label_column for a CSV, or an .npz with x and y)")
        if not x_path.is_file():
            raise FileNotFoundError(f"x file {x_path} does not exist")
        try:
            with np.load(x_path, allow_pickle=False) as archive:
                if not {"x", "y"} <= set(archive.files):
                    raise ValueError(f"holds {archive.files}; without y it needs 'x' and 'y'")
                features, labels = np.asarray(archive["x"]), np.asarray(archive["y"])
        except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{x_path}: not a readable .npz file: {exc}") from exc
    else:
        features = _load_array(x_path, "x")
        y_path = Path(y)
        origin = _Origin(x_path, y_path)
        if y_path.suffix.lower() == ".csv":
            if not y_path.is_file():
                raise FileNotFoundError(f"y file {y_path} does not exist")
            _, rows, lines = _read_csv(y_path)
            if len(rows[0]) != 1:
                raise ValueError(f"{y_path}: a labels CSV needs one column, found {len(rows[0])}")
            labels, class_names = _labels_from_strings([row[0] for row in rows])
            origin = _Origin(x_path, y_path, lines if x_path.suffix.lower() == ".csv" else None)
        else:
            labels = np.asarray(_load_array(y_path, "y"))
    if features.dtype.kind not in "biuf":
        raise ValueError(f"{origin.x}: features have dtype {features.dtype}; expected numbers")
    if labels.dtype.kind in "US":
        if labels.ndim != 1:
            raise ValueError(f"{origin.y}: string labels must be 1-D, got shape {labels.shape}")
        labels, class_names = _labels_from_strings([str(v) for v in labels.tolist()])
    elif labels.dtype.kind not in "biuf":
        raise ValueError(
            f"{origin.y}: labels have dtype {labels.dtype}; expected integers, floats or strings"
        )
    if features.ndim == 0:
        raise ValueError(f"{origin.x}: holds a single value, expected one row per sample")
    if features.ndim == 1:
        features = features.reshape(-1, 1)
    if len(features) != len(labels):
        raise ValueError(f"x has {len(features)} samples but y has {len(labels)}")
    if len(features) < 2:
        raise ValueError(f"x has {len(features)} sample(s); need at least 2")
    return features, labels, class_names, origin


def _labels_for_task(
    labels: np.ndarray[Any, Any], class_names: list[str] | None, task: str | None, where: Path
) -> tuple[np.ndarray[Any, Any], dict[str, Any], str]:
    """Labels in their stored form, the task's metadata and the label dtype."""
    if task is None:
        task = "classification" if labels.dtype.kind in "biu" else "regression"
    if task == "regression":
        return labels, {"task": task, "target_shape": list(labels.shape[1:])}, "float32"
    if task != "classification":
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if labels.ndim != 1:
        raise ValueError(f"{where}: classification labels must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind == "f" and not np.all(np.mod(labels, 1) == 0):
        k = int(np.flatnonzero(np.mod(labels, 1) != 0)[0])
        raise ValueError(
            f"{where}: classification labels must be integers; label {k} is {labels[k]}"
        )
    labels = labels.astype(np.int64)
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"{where}: class labels must be >= 0, got {low}")
    num_classes = high + 1
    distinct = len(np.unique(labels))
    if num_classes > max(MAX_CLASSES_PER_LABEL * distinct, MIN_CLASSES_CAP):
        raise ValueError(
            f"{where}: label {high} would make {num_classes} classes, but only {distinct} "
            f"distinct label(s) occur in {len(labels)} samples; class labels must be 0..K-1 "
            "(remap them, e.g. with numpy.unique(y, return_inverse=True)), or use "
            "--task regression"
        )
    metadata: dict[str, Any] = {"task": task, "num_classes": num_classes}
    if class_names is not None:
        metadata["class_names"] = class_names
    return labels, metadata, "int64"


def _column_index(column: str | int, header: list[str] | None, width: int, path: Path) -> int:
    if header is not None and str(column) in header:
        return header.index(str(column))
    if isinstance(column, int) or str(column).isdigit():
        index = int(column)
        if 0 <= index < width:
            return index
    names = f"columns {header}" if header else f"{width} columns (no header row)"
    raise ValueError(f"{path}: label_column {column!r} not found; it has {names}")
