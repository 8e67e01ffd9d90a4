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

__all__ = ["BUILTIN_SOURCES", "open_data"]


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
