"""``SegmentedDataset``: read a segmented dataset as a map-style torch Dataset; ``collate``.

Segments are mapped lazily in the process that reads (so DataLoader workers map their own,
under fork and spawn) and every sample is returned as a copy: a tensor that views a read-only
map segfaults on the first in-place write. ``__getitems__`` gathers a whole batch per segment
straight into the batch tensors, which ``collate`` passes through without another copy.
"""

from __future__ import annotations

import bisect
import copy
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rangerdl.data.manifest import MANIFEST_NAME, TOKENS_FIELD, FieldSpec, Manifest

__all__ = ["VERIFY_MODES", "SampleBatch", "SegmentedDataset", "collate", "open_splits"]

VERIFY_MODES = ("sizes", "checksum")


def _torch_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype samples are returned in: unsigned ints widen to int64 (torch lacks their arithmetic)."""
    return np.dtype(np.int64) if dtype.kind == "u" else dtype


class SegmentedDataset(Dataset[dict[str, Tensor]]):
    """A map-style dataset over a segmented directory; ``ds[i]`` is a dict of tensors.

    Rows datasets return their fields as written (unsigned ints widened to int64). Token datasets
    return ``{"x": tokens[i*L : i*L+L], "y": tokens[i*L+1 : i*L+L+1]}`` as int64 (next-token
    prediction; windows do not overlap, except for the one token ``y`` looks ahead). Every tensor is
    a copy, never a view of the map. ``ds[None]`` is a padding sample (zeros and ``"mask": False``),
    which ``GlobalBatchSampler(drop_last=False)`` asks for and ``collate`` turns into a mask.

    Opening reads the manifest and every ``.npy`` header and checks them (a few small reads per
    segment); the data is mapped lazily by the process that reads it, so the object pickles as its
    path (DataLoader workers under fork or spawn map their own) and an unpickled copy refuses to
    read if the manifest was replaced in the meantime.

    Args:
        path: the dataset directory (holding ``manifest.json``).
        verify: ``"sizes"`` checks presence, size, dtype and shape of every file;
            ``"checksum"`` also hashes all data against the manifest (reads everything once).

    Raises:
        FileNotFoundError: the directory, its manifest or a segment file is missing.
        ValueError: the manifest is malformed or does not match a file; the message names the file.
    """

    def __init__(self, path: str | os.PathLike[str], verify: str = "sizes") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        self.verify = verify
        manifest = Manifest.read(self.path)
        manifest.verify(self.path, checksum=verify == "checksum")
        self._setup(manifest)

    def _setup(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._checksum = manifest.checksum
        self._starts_array = np.cumsum([0] + [s.num_rows for s in manifest.segments])
        self._starts: list[int] = self._starts_array.tolist()
        self._maps: list[dict[str, np.ndarray[Any, Any]] | None] = [None] * len(manifest.segments)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "verify": self.verify, "checksum": self._checksum}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.verify = state["verify"]
        manifest = Manifest.read(self.path)
        if manifest.checksum != state["checksum"]:
            raise ValueError(
                f"{self.path / MANIFEST_NAME} changed after the dataset was opened "
                f"(checksum {manifest.checksum[:12]}, opened as {state['checksum'][:12]})"
            )
        self._setup(manifest)

    @property
    def metadata(self) -> dict[str, Any]:
        """The manifest's free-form metadata (a copy)."""
        return copy.deepcopy(self._manifest.metadata)

    @property
    def checksum(self) -> str:
        """sha256 identifying the manifest's content (data checksums, fields, metadata)."""
        return self._checksum

    @property
    def kind(self) -> str:
        """``"rows"`` or ``"tokens"``."""
        return self._manifest.kind

    @property
    def seq_len(self) -> int | None:
        """Window length of a token dataset, else None."""
        return self._manifest.seq_len

    @property
    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored fields: name -> (dtype name, per-sample shape)."""
        return {n: (s.dtype.name, s.shape) for n, s in self._manifest.fields.items()}

    @property
    def num_segments(self) -> int:
        """Number of segments."""
        return len(self._manifest.segments)

    @property
    def nbytes(self) -> int:
        """Bytes of all segment files."""
        return self._manifest.nbytes

    @property
    def manifest(self) -> Manifest:
        """The parsed manifest."""
        return self._manifest

    def __len__(self) -> int:
        return self._manifest.num_samples

    def __repr__(self) -> str:
        return (
            f"SegmentedDataset({str(self.path)!r}, kind={self.kind!r}, num_samples={len(self)}, "
            f"num_segments={self.num_segments})"
        )

    def __getitem__(self, index: int | None) -> dict[str, Tensor]:
        if index is None:
            return self._padding()
        i = self._check_index(index)
        if self.kind == "tokens":
            seq_len = self._seq_len()
            window = self._tokens(i * seq_len, i * seq_len + seq_len + 1)
            return {"x": torch.from_numpy(window[:-1]), "y": torch.from_numpy(window[1:].copy())}
        s = bisect.bisect_right(self._starts, i) - 1
        maps = self._segment(s)
        j = i - self._starts[s]
        out = {}
        for name, spec in self._manifest.fields.items():
            value = np.array(maps[name][j], dtype=_torch_dtype(spec.dtype))
            out[name] = torch.from_numpy(value)
        return out

    def __getitems__(self, indices: Sequence[int | None]) -> SampleBatch:
        """Samples ``indices`` (None: padding) read together; DataLoader calls this per batch.

        One gather per segment and field straight into the batch's tensors, so ``collate`` has
        nothing left to copy. The result is a sequence of per-sample dicts for any other collate.
        """
        n = len(self)
        pads = [k for k, i in enumerate(indices) if i is None]
        idx = np.fromiter((0 if i is None else operator.index(i) for i in indices), np.int64)
        idx[idx < 0] += n
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise IndexError(f"index {indices[k]} out of range for a dataset of {n} samples")
        if self.kind == "tokens":
            columns = self._token_windows(idx)
        else:
            columns = {
                name: self._gather(name, spec, idx) for name, spec in self._manifest.fields.items()
            }
        mask = None
        if pads:
            for column in columns.values():
                column[pads] = 0
            mask = torch.ones(len(idx), dtype=torch.bool)
            mask[pads] = False
        return SampleBatch(columns, mask)

    def _gather(self, name: str, spec: FieldSpec, idx: np.ndarray[Any, Any]) -> Tensor:
        out = np.empty((len(idx), *spec.shape), spec.dtype)
        if len(self._starts) == 2:  # one segment: a single gather
            np.take(self._segment(0)[name], idx, axis=0, out=out)
        else:
            seg_of = np.searchsorted(self._starts_array, idx, side="right") - 1
            for s in np.unique(seg_of).tolist():
                rows = np.flatnonzero(seg_of == s)
                out[rows] = np.take(self._segment(s)[name], idx[rows] - self._starts[s], axis=0)
        wide = _torch_dtype(spec.dtype)
        return torch.from_numpy(out if wide == spec.dtype else out.astype(wide))

    def _check_index(self, index: Any) -> int:
        n = len(self)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        return i

    def _seq_len(self) -> int:
        seq_len = self._manifest.seq_len
        assert seq_len is not None
        return seq_len

    def _segment(self, s: int) -> dict[str, np.ndarray[Any, Any]]:
        maps = self._maps[s]
        if maps is None:
            files = self._manifest.segments[s].files
            # Plain ndarray views of the maps (the memmap subclass adds overhead to every index);
            # each view keeps its map alive, and nothing closes a map by hand.
            maps = {
                name: np.load(self.path / info.name, mmap_mode="r", allow_pickle=False).view(
                    np.ndarray
                )
                for name, info in files.items()
            }
            self._maps[s] = maps
        return maps

    def _tokens(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Tokens ``[start, stop)`` of the stream as a fresh int64 array (may span segments)."""
        out = np.empty(stop - start, np.int64)
        s = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            seg_start, seg_stop = self._starts[s], self._starts[s + 1]
            take = min(stop, seg_stop) - pos
            out[pos - start : pos - start + take] = self._segment(s)[TOKENS_FIELD][
                pos - seg_start : pos - seg_start + take
            ]
            pos += take
            s += 1
        return out

    def _token_windows(self, idx: np.ndarray[Any, Any]) -> dict[str, Tensor]:
        seq_len = self._seq_len()
        starts = idx * seq_len
        windows = np.empty((len(idx), seq_len + 1), np.int64)
        seg_first = np.searchsorted(self._starts_array, starts, side="right") - 1
        seg_last = np.searchsorted(self._starts_array, starts + seq_len, side="right") - 1
        offsets = np.arange(seq_len + 1)
        for s in np.unique(seg_first).tolist():
            inside = np.flatnonzero((seg_first == s) & (seg_last == s))
            if len(inside):
                local = starts[inside] - self._starts[s]
                windows[inside] = self._segment(s)[TOKENS_FIELD][local[:, None] + offsets]
        for k in np.flatnonzero(seg_first != seg_last).tolist():
            windows[k] = self._tokens(int(starts[k]), int(starts[k]) + seq_len + 1)
        return {
            "x": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
            "y": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
        }

    def _padding(self) -> dict[str, Tensor]:
        if self.kind == "tokens":
            zeros = torch.zeros(self._seq_len(), dtype=torch.int64)
            return {"x": zeros, "y": zeros.clone(), "mask": torch.tensor(False)}
        out = {
            name: torch.from_numpy(np.zeros(spec.shape, _torch_dtype(spec.dtype)))
            for name, spec in self._manifest.fields.items()
        }
        out["mask"] = torch.tensor(False)
        return out


class SampleBatch(Sequence[dict[str, Tensor]]):
    """Samples read together by ``SegmentedDataset.__getitems__``: batch tensors plus per-sample views.

    ``collate`` returns the columns as they are (no copy); any other collate function sees a
    sequence of per-sample dicts, like ``[ds[i] for i in indices]``.
    """

    def __init__(self, columns: dict[str, Tensor], mask: Tensor | None = None) -> None:
        self.columns = columns
        self.mask = mask

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    @overload
    def __getitem__(self, k: int) -> dict[str, Tensor]: ...

    @overload
    def __getitem__(self, k: slice) -> list[dict[str, Tensor]]: ...

    def __getitem__(self, k: int | slice) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        item = {name: column[k] for name, column in self.columns.items()}
        if self.mask is not None:  # every sample of a padded batch carries it, for any collate
            item["mask"] = self.mask[k]
        return item


def collate(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Stack samples into a batch: ``{"x": (B, ...), "y": (B, ...)}``.

    When any sample is padding (it has ``"mask": False``), the batch also holds ``"mask"``, a bool
    tensor of shape ``(B,)`` that is True for real samples. A ``SampleBatch`` (what the dataset's
    ``__getitems__`` returns) is already stacked and is passed through without a copy.
    """
    if isinstance(items, SampleBatch):
        batch = dict(items.columns)
        if items.mask is not None:
            batch["mask"] = items.mask
        return batch
    if not items:
        raise ValueError("collate: empty batch")
    names = [k for k in items[0] if k != "mask"]
    batch = {name: torch.stack([item[name] for item in items]) for name in names}
    if any("mask" in item for item in items):
        batch["mask"] = torch.tensor([bool(item.get("mask", True)) for item in items])
    return batch


def open_splits(path: str | os.PathLike[str], verify: str = "sizes") -> dict[str, SegmentedDataset]:
    """Open the splits of a prepared directory: every sub-directory holding a ``manifest.json``.

    Returns:
        ``{"train": ..., "val": ..., "test": ...}`` (those present; train first, then val, test,
        then any others by name).

    Raises:
        FileNotFoundError: ``path`` or ``path/train`` is missing, or ``path`` is a single dataset.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"prepared dataset directory {root} does not exist")
    if (root / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"{root} is a single dataset (it holds {MANIFEST_NAME}), not a directory of splits "
            "(train/, test/); open it with SegmentedDataset, or point at its parent"
        )
    found = sorted(p.name for p in root.iterdir() if (p / MANIFEST_NAME).is_file())
    if "train" not in found:
        detail = f"found splits {found}" if found else "no split holds a manifest.json"
        raise FileNotFoundError(
            f"{root / 'train' / MANIFEST_NAME} not found ({detail}); prepare one with "
            "'rangerdl data prepare KIND --out DIR'"
        )
    rank = {"train": 0, "val": 1, "test": 2}
    names = sorted(found, key=lambda n: (rank.get(n, 3), n))
    return {name: SegmentedDataset(root / name, verify=verify) for name in names}
