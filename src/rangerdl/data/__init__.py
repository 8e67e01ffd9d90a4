"""Memory-mapped, segmented datasets: larger than RAM, exactly once per epoch, resumable, per rank.

- ``manifest.py``: the on-disk format (``manifest.json`` + one ``.npy`` per segment and field).
- ``writer.py``: ``SegmentWriter``; ``dataset.py``: ``SegmentedDataset`` (a map-style torch
  Dataset), ``collate`` and ``open_splits`` (``DIR/train``, ``DIR/val``, ``DIR/test``).
- ``order.py``: ``GlobalBatchSampler``, the order (a seeded permutation per epoch) cut into global
  batches and sliced per rank, with a ``state_dict`` for exact resume.
- ``sources.py`` (+ ``text.py``, ``arrays.py``, ``splits.py``): ``prepare`` for the built-in
  sources ``digits``, ``text``, ``arrays`` and ``synthetic``; ``commands.py``: the CLI.

Importing this package is cheap: numpy and torch load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "GlobalBatchSampler",
    "SampleBatch",
    "SegmentWriter",
    "SegmentedDataset",
    "collate",
    "epoch_order",
    "open_splits",
    "prepare",
]

if TYPE_CHECKING:
    from rangerdl.data.dataset import SampleBatch, SegmentedDataset, collate, open_splits
    from rangerdl.data.order import GlobalBatchSampler, epoch_order
    from rangerdl.data.sources import prepare
    from rangerdl.data.writer import SegmentWriter

_HOMES = {
    "GlobalBatchSampler": "order",
    "epoch_order": "order",
    "SampleBatch": "dataset",
    "SegmentWriter": "writer",
    "SegmentedDataset": "dataset",
    "collate": "dataset",
    "open_splits": "dataset",
    "prepare": "sources",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rangerdl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rangerdl.data.{home}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
