"""The datasets a run reads: ``[data] path``, or a built-in source prepared on first use."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rangerdl.train.choices import BUILTIN_SOURCES
from rangerdl.train.config import DataConfig
from rangerdl.train.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_SOURCES", "open_data", "training_splits"]


def open_data(cfg: DataConfig, rt: Runtime) -> dict[str, Any]:
    """``{split name: SegmentedDataset}`` of ``cfg.path``, or of a built-in source prepared on
    first use (by local rank 0; the others wait) into the cache folder (``cfg.cache_dir``, else
    ``$RANGERDL_CACHE``, else ``~/.cache/rangerdl``).

    Raises:
        ValueError: an unknown ``source``; a damaged dataset (from ``open_splits``).
        FileNotFoundError: ``path`` does not exist.
    """
    from rangerdl.data import open_splits, prepare

    if cfg.path:
        return open_splits(Path(cfg.path))
    if cfg.source not in BUILTIN_SOURCES:
        raise ValueError(
            f"[data] source = {cfg.source!r}: expected one of {', '.join(BUILTIN_SOURCES)} "
            "(or set [data] path to a prepared dataset)"
        )
    options: dict[str, Any] = {"seq_len": cfg.seq_len} if cfg.source == "text" else {}
    folder_name = f"text-L{cfg.seq_len}" if cfg.source == "text" else cfg.source
    cache = Path(
        cfg.cache_dir or os.environ.get("RANGERDL_CACHE") or Path.home() / ".cache" / "rangerdl"
    )
    folder = cache / folder_name
    if rt.local_rank == 0 and not (folder / "train").is_dir():
        log.info("preparing the built-in %r dataset in %s (first use)", cfg.source, folder)
        tmp = cache / f".tmp-{folder_name}-{os.getpid()}"
        prepare(cfg.source, tmp, **options)
        try:
            os.replace(tmp, folder)
        except OSError:  # another job prepared it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    rt.barrier()
    return open_splits(folder)


def training_splits(splits: dict[str, Any], val_fraction: float, seed: int) -> tuple[Any, Any, str]:
    """``(train, val, what val is)``: the dataset's own ``val`` split, or ``val_fraction`` of
    ``train`` held out (a seeded random set, the rest trains), or, with ``val_fraction = 0``, the
    test split. The test split is then touched once, at the end.

    Raises:
        ValueError: the train split is too small to hold out from.
    """
    import numpy as np

    train = splits["train"]
    if "val" in splits:
        return train, splits["val"], "the val split"
    if val_fraction == 0:
        return train, splits.get("test"), "the test split ([data] val_fraction = 0)"
    n = len(train)
    held = round(n * val_fraction)
    if held < 1 or held >= n:
        raise ValueError(
            f"[data] val_fraction = {val_fraction} of {n} training samples leaves no validation "
            "or no training samples; change it, or prepare a val split"
        )
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:held]), np.sort(order[held:])
    what = f"{held} samples held out of train ([data] val_fraction = {val_fraction})"
    return Rows(train, train_idx), Rows(train, val_idx), what


class Rows:
    """The samples ``rows`` (a 1-D int64 array) of ``base``, renumbered 0..len-1; ``None`` (a
    padding sample from the sampler) passes through. Batched reads stay batched."""

    def __init__(self, base: Any, rows: Any) -> None:
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def _map(self, i: int | None) -> int | None:
        return None if i is None else int(self.rows[i])

    def __getitem__(self, i: int | None) -> Any:
        return self.base[self._map(i)]

    def __getitems__(self, indices: list[int | None]) -> Any:
        return self.base.__getitems__([self._map(i) for i in indices])
