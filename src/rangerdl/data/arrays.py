"""The ``arrays`` source: user features and labels from ``.npy``, ``.npz`` or ``.csv``."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from rangerdl.data.splits import split_indices, write_rows
from rangerdl.data.writer import DEFAULT_SEGMENT_BYTES

__all__ = ["prepare_arrays"]


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
    features, labels, class_names = _read_arrays(x_path, y, label_column)
    labels, metadata, y_dtype = _labels_for_task(labels, class_names, task)
    metadata["input_shape"] = list(features.shape[1:])
    metadata["source"] = f"arrays x={x_path}" + (f" y={y}" if y is not None else "")
    metadata["split"] = {"test_fraction": test_fraction, "seed": seed}
    stratify = labels if metadata["task"] == "classification" else None
    train, test = split_indices(stratify, len(labels), test_fraction, seed)
    for name, rows in (("train", train), ("test", test)):
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
            )


def _read_arrays(
    x_path: Path, y: str | os.PathLike[str] | None, label_column: str | int | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str] | None]:
    """Features (2-D at least), labels and, for string labels, the class names."""
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
            _, rows = _read_csv(y_path)
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
    return features, labels, class_names


def _labels_for_task(
    labels: np.ndarray[Any, Any], class_names: list[str] | None, task: str | None
) -> tuple[np.ndarray[Any, Any], dict[str, Any], str]:
    """Labels in their stored form, the task's metadata and the label dtype."""
    if task is None:
        task = "classification" if labels.dtype.kind in "biu" else "regression"
    if task == "regression":
        return labels, {"task": task, "target_shape": list(labels.shape[1:])}, "float32"
    if task != "classification":
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if labels.dtype.kind == "f" and not np.all(np.mod(labels, 1) == 0):
        raise ValueError("classification labels must be integers; got fractional values")
    if labels.ndim != 1:
        raise ValueError(f"classification labels must be 1-D, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"class labels must be >= 0, got {labels.min()}")
    num_classes = int(labels.max()) + 1
    metadata = {
        "task": task,
        "num_classes": num_classes,
        "class_names": class_names or [str(c) for c in range(num_classes)],
    }
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
