"""Memory-mapped, segmented datasets: larger than RAM, exactly once per epoch, resumable, per rank.

- ``SegmentWriter`` / ``SegmentedDataset``: the on-disk format (``manifest.json`` + ``.npy``
  segments) and its map-style torch reader; ``open_splits`` opens ``DIR/train``, ``DIR/test``, ...
- ``GlobalBatchSampler``: the order (a seeded permutation per epoch) cut into global batches,
  sliced per rank, with a ``state_dict`` for exact resume; ``collate`` stacks its batches.
- ``prepare``: built-in sources (``digits``, ``text``, ``arrays``, ``synthetic``).

Importing this package is cheap: numpy and torch load on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "GlobalBatchSampler",
    "SegmentWriter",
    "SegmentedDataset",
    "collate",
    "epoch_order",
    "open_splits",
    "prepare",
]

if TYPE_CHECKING:
    from rangerdl.data.order import GlobalBatchSampler, epoch_order
    from rangerdl.data.segments import SegmentedDataset, SegmentWriter, collate, open_splits
    from rangerdl.data.sources import prepare

_HOMES = {
    "GlobalBatchSampler": "order",
    "epoch_order": "order",
    "SegmentWriter": "segments",
    "SegmentedDataset": "segments",
    "collate": "segments",
    "open_splits": "segments",
    "prepare": "sources",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rangerdl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rangerdl.data.{home}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
