"""Helpers shared by the built-in sources: argument checks, train/test split, chunked writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rangerdl.data.writer import SegmentWriter

__all__ = [
    "CHUNK_BYTES",
    "HEADROOM_BYTES",
    "check_fraction",
    "check_positive_int",
    "split_indices",
    "write_rows",
]

CHUNK_BYTES = 32 << 20  # bytes of samples converted at a time while writing
# Added to the data bytes a prepare checks for: .npy headers, manifests, file-system blocks.
HEADROOM_BYTES = 1 << 20


def split_indices(
    labels: np.ndarray[Any, Any] | None, num: int, test_fraction: float, seed: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Sorted train and test row indices; stratified by ``labels`` when every class allows it."""
    check_fraction("test_fraction", test_fraction)
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


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def write_rows(
    out: Path,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    rows: np.ndarray[Any, Any],
    *,
    x_dtype: str,
    y_dtype: str,
    metadata: dict[str, Any],
    segment_bytes: int,
    x_map: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]] | None = None,
) -> None:
    """Write ``x[rows]``, ``y[rows]`` in chunks (``x`` may be a memmap larger than RAM);
    ``x_map`` (e.g. standardisation) is applied to each chunk of ``x`` before the cast."""
    fields = {"x": (x_dtype, x.shape[1:]), "y": (y_dtype, y.shape[1:])}
    row_bytes = max(1, x[:1].nbytes + y[:1].nbytes)
    chunk = max(1, CHUNK_BYTES // row_bytes)
    with SegmentWriter(out, fields, segment_bytes=segment_bytes, metadata=metadata) as writer:
        for start in range(0, len(rows), chunk):
            take = rows[start : start + chunk]
            x_take = x[take] if x_map is None else x_map(x[take])
            writer.append(x=np.asarray(x_take, dtype=x_dtype), y=np.asarray(y[take], y_dtype))
