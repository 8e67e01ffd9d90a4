"""The datasets a run reads: ``[data] path``, or a built-in source prepared on first use."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rangerdl.train.choices import BUILTIN_SOURCES
from rangerdl.train.config import DataConfig
from rangerdl.train.runtime import Runtime, peer_error, raise_peer_error

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_SOURCES", "open_data", "training_splits"]


def open_data(cfg: DataConfig, rt: Runtime) -> dict[str, Any]:
    """``{split name: SegmentedDataset}`` of ``cfg.path``, or of a built-in source prepared on
    first use (by local rank 0; the others wait) into the cache folder (``cfg.cache_dir``, else
    ``$RANGERDL_CACHE``, else ``~/.cache/rangerdl``).

    The ranks of a job then compare what they opened, by content: a ``path`` or cache folder
    that resolves per node (a relative path, a per-node cache) to other data is refused on every
    rank, naming both datasets, before any training.

    Raises:
        ValueError: an unknown ``source``; a damaged dataset (from ``open_splits``); ranks that
            read different datasets.
        FileNotFoundError: ``path`` does not exist (on any rank).
    """
    from rangerdl.data import open_splits

    if not cfg.path and cfg.source not in BUILTIN_SOURCES:
        raise ValueError(
            f"[data] source = {cfg.source!r}: expected one of {', '.join(BUILTIN_SOURCES)} "
            "(or set [data] path to a prepared dataset)"
        )
    root = Path(cfg.path) if cfg.path else _cache_folder(cfg)
    problem = None
    try:
        if not cfg.path:
            _prepare_once(cfg, root, rt)
        splits = open_splits(root)
    except (ValueError, OSError) as exc:
        if not rt.distributed:
            raise
        splits, problem = {}, exc
    if rt.distributed:
        _agree_on_data(root, splits, problem, rt)
    return splits


def _cache_folder(cfg: DataConfig) -> Path:
    """Where built-in source ``cfg.source`` is prepared (``text`` per sequence length and, with
    ``text_sources``, per list of sources: a digest of the list as given)."""
    cache = Path(
        cfg.cache_dir or os.environ.get("RANGERDL_CACHE") or Path.home() / ".cache" / "rangerdl"
    )
    if cfg.source != "text":
        return cache / cfg.source
    if not cfg.text_sources:
        return cache / f"text-L{cfg.seq_len}"
    digest = hashlib.sha256(json.dumps(cfg.text_sources).encode()).hexdigest()[:12]
    return cache / f"text-L{cfg.seq_len}-{digest}"


def _prepare_once(cfg: DataConfig, folder: Path, rt: Runtime) -> None:
    from rangerdl.data import prepare

    options: dict[str, Any] = {"seq_len": cfg.seq_len} if cfg.source == "text" else {}
    if cfg.text_sources:
        options["sources"] = [os.path.expanduser(s) for s in cfg.text_sources]
    try:
        if rt.local_rank == 0 and not (folder / "train").is_dir():
            log.info("preparing the built-in %r dataset in %s (first use)", cfg.source, folder)
            tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
            prepare(cfg.source, tmp, **options)
            try:
                os.replace(tmp, folder)
            except OSError:  # another job prepared it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
    finally:  # also on a failure, so that every rank is at the same collective next
        rt.barrier()


def _agree_on_data(
    root: Path, splits: dict[str, Any], problem: BaseException | None, rt: Runtime
) -> None:
    """Refuse on every rank at once when one rank could not open its data, or opened data whose
    split names or manifest checksums differ from rank 0's."""
    error = None if problem is None else peer_error(problem)
    mine = {
        "where": str(root.resolve()),
        "splits": {name: ds.checksum for name, ds in splits.items()},
        "problem": error,
    }
    everyone = rt.all_gather_object(mine)
    failed = [(r, theirs["problem"]) for r, theirs in enumerate(everyone) if theirs["problem"]]
    if problem is not None:
        raise problem
    if failed:
        rank, error = failed[0]
        raise_peer_error(error, f"rank {rank} cannot open its data")
    first = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        differs = f"rank {rank} reads a different dataset than rank 0"
        hint = (
            "every rank must read the same data: point [data] path (or each node's cache) at "
            "identical copies"
        )
        if list(theirs["splits"]) != list(first["splits"]):
            raise ValueError(
                f"{differs}: splits {', '.join(theirs['splits'])} ({theirs['where']}) vs "
                f"{', '.join(first['splits'])} ({first['where']}); {hint}"
            )
        for name, checksum in theirs["splits"].items():
            if checksum != first["splits"][name]:
                raise ValueError(
                    f"{differs}: {name} split checksum {checksum[:16]} ({theirs['where']}) vs "
                    f"{first['splits'][name][:16]} ({first['where']}); {hint}"
                )


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
