"""Sample order: a seeded permutation per epoch, cut into global batches, sliced per rank, resumable.

The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(N)``; global batch ``b``
is positions ``[b G, (b + 1) G)`` of it; rank ``r`` of ``W`` takes the ``G / W`` positions
``[b G + r G/W, b G + (r + 1) G/W)``. Nothing depends on ``num_workers``, and the union of the ranks'
batches at a step is the single-process batch, so a run may resume with another world size.

Progress is counted by the training loop (``advance``), not by the iterator: a DataLoader
prefetches batches it has not trained on, and resuming from the iterator's cursor would skip them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from rangerdl._fileio import preallocate

__all__ = ["MAX_RAM_SAMPLES", "GlobalBatchSampler", "epoch_order"]

logger = logging.getLogger(__name__)

# Orders of more samples than this are built in a file-backed array (4M int64 = 32 MiB of RAM).
MAX_RAM_SAMPLES = 1 << 22
STATE_VERSION = 1
_FILL_CHUNK = 1 << 22


def epoch_order(
    num_samples: int,
    seed: int,
    epoch: int,
    *,
    max_ram_samples: int = MAX_RAM_SAMPLES,
    order_dir: str | None = None,
) -> np.ndarray[Any, Any]:
    """The order of one epoch: ``np.random.default_rng([seed, epoch]).permutation(num_samples)``.

    Above ``max_ram_samples`` the same permutation is built in place in an unlinked temporary
    file (in ``order_dir``, default the system temp dir; it should not be tmpfs, which is RAM) and
    returned as a read-only-by-convention memmap, so 10^8 samples need no RAM. ``Generator.shuffle``
    draws the same swaps for any dtype, so int32 storage gives the identical order.
    """
    rng = np.random.default_rng([seed, epoch])
    if num_samples <= max_ram_samples:
        return rng.permutation(num_samples)
    dtype = np.int32 if num_samples < 2**31 else np.int64
    with tempfile.TemporaryFile(prefix="rangerdl-order-", dir=order_dir) as fh:
        # Reserve the blocks first: on a full disk a write into a sparse map is a SIGBUS.
        preallocate(
            fh.fileno(),
            num_samples * np.dtype(dtype).itemsize,
            f"the order of {num_samples} samples in {order_dir or tempfile.gettempdir()}",
        )
        # The map keeps the unlinked file alive after the handle closes; no file is left behind.
        order = np.memmap(fh, dtype=dtype, mode="w+", shape=(num_samples,))
    for start in range(0, num_samples, _FILL_CHUNK):
        stop = min(num_samples, start + _FILL_CHUNK)
        order[start:stop] = np.arange(start, stop, dtype=dtype)
    # Shuffle a plain ndarray view: given the memmap subclass, numpy takes a generic path ~100x slower.
    rng.shuffle(order.view(np.ndarray))
    return order


class GlobalBatchSampler:
    """A batch sampler over global batches for rank ``rank`` of ``world_size``; resumable.

    Use it as a DataLoader ``batch_sampler``. Iterating yields this rank's index lists forever,
    epoch after epoch, from the current position; the training loop calls ``advance(1)`` after it
    has consumed one global batch, and ``state_dict()`` records that progress. A new iterator (or
    DataLoader) made after ``load_state_dict`` continues exactly where the loop stopped. As the
    iteration never ends there is no ``__len__``: use ``batches_per_epoch``.

    With ``drop_last=True`` the last ``num_samples % global_batch_size`` positions of each epoch's
    order are skipped (``num_dropped``; a different random set each epoch). With ``drop_last=False``
    the last global batch is filled with ``None``, which ``SegmentedDataset`` turns into padding
    samples and ``collate`` into ``batch["mask"]``: every sample is seen exactly once, none twice.

    Args:
        num_samples: dataset length N.
        global_batch_size: samples per step over all ranks, G; a multiple of ``world_size``.
        rank: this process's rank.
        world_size: number of ranks W.
        seed: order seed (non-negative int).
        drop_last: drop the incomplete last batch of each epoch, or pad it with a mask.
        shuffle: False gives positions in dataset order (evaluation).
        manifest_checksum: ``SegmentedDataset.checksum``, saved in and checked by the state.
        max_ram_samples: orders of more samples are built file-backed (see ``epoch_order``).
        order_dir: directory for file-backed orders (default: system temp dir).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        manifest_checksum: str | None = None,
        max_ram_samples: int = MAX_RAM_SAMPLES,
        order_dir: str | None = None,
    ) -> None:
        for name, value, low in (
            ("num_samples", num_samples, 1),
            ("global_batch_size", global_batch_size, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("seed", seed, 0),
            ("max_ram_samples", max_ram_samples, 0),
        ):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a multiple of world_size {world_size}"
            )
        if drop_last and num_samples < global_batch_size:
            raise ValueError(
                f"num_samples {num_samples} < global_batch_size {global_batch_size}: with "
                "drop_last=True an epoch has no batch; use drop_last=False or a smaller batch"
            )
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.manifest_checksum = manifest_checksum
        self.max_ram_samples = int(max_ram_samples)
        self.order_dir = order_dir
        self._epoch = 0
        self._consumed = 0
        self._orders: dict[int, np.ndarray[Any, Any]] = {}
        self._announced = False

    @property
    def local_batch_size(self) -> int:
        """Indices per yielded list: ``global_batch_size // world_size``."""
        return self.global_batch_size // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in an epoch (from its start)."""
        n, g = self.num_samples, self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    @property
    def num_dropped(self) -> int:
        """Samples skipped per epoch by ``drop_last`` (0 with ``drop_last=False``)."""
        return self.num_samples % self.global_batch_size if self.drop_last else 0

    @property
    def num_padded(self) -> int:
        """Padding entries in an epoch's last batch with ``drop_last=False`` (0 otherwise)."""
        return 0 if self.drop_last else -self.num_samples % self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the training loop is in."""
        return self._epoch

    @property
    def consumed(self) -> int:
        """Positions of the current epoch's order the training loop has consumed."""
        return self._consumed

    @property
    def position(self) -> int:
        """Index of the next global batch within the current epoch."""
        return self._consumed // self.global_batch_size

    def advance(self, num_batches: int = 1) -> None:
        """Record that the training loop consumed ``num_batches`` more global batches."""
        if not _is_int(num_batches) or num_batches < 0:
            raise ValueError(f"num_batches must be an int >= 0, got {num_batches!r}")
        for _ in range(num_batches):
            self._consumed += self.global_batch_size
            self._epoch, self._consumed = self._normalize(self._epoch, self._consumed)

    def _has_batch(self, consumed: int) -> bool:
        if self.drop_last:
            return consumed + self.global_batch_size <= self.num_samples
        return consumed < self.num_samples

    def _normalize(self, epoch: int, consumed: int) -> tuple[int, int]:
        """Move past an epoch's end: there the next batch is the next epoch's first."""
        return (epoch, consumed) if self._has_batch(consumed) else (epoch + 1, 0)

    def _order(self, epoch: int) -> np.ndarray[Any, Any] | None:
        """The epoch's order (None: identity, when not shuffling); the last two are cached."""
        if not self.shuffle:
            return None
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_order(
                self.num_samples,
                self.seed,
                epoch,
                max_ram_samples=self.max_ram_samples,
                order_dir=self.order_dir,
            )
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = order
        return order

    def _take(self, order: np.ndarray[Any, Any] | None, start: int, stop: int) -> list[int | None]:
        real = min(stop, self.num_samples)
        if order is None:
            indices: list[int | None] = list(range(start, real))
        else:
            indices = list(order[start:real].tolist()) if start < real else []
        return indices + [None] * (stop - max(start, real))

    def __iter__(self) -> Iterator[list[int | None]]:
        if not self._announced and self.rank == 0:
            self._announced = True
            if self.num_dropped:
                logger.info(
                    "drop_last: %d of %d samples are skipped each epoch (a different random set)",
                    self.num_dropped,
                    self.num_samples,
                )
        return self._batches(self._epoch, self._consumed)

    def _batches(self, epoch: int, consumed: int) -> Iterator[list[int | None]]:
        low = self.rank * self.local_batch_size
        high = low + self.local_batch_size
        while True:
            order = self._order(epoch)
            while self._has_batch(consumed):
                yield self._take(order, consumed + low, consumed + high)
                consumed += self.global_batch_size
            epoch, consumed = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """The loop's progress as plain types (JSON- and ``torch.load(weights_only=True)``-safe)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self._epoch,
            "consumed": self._consumed,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.num_samples,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "manifest_checksum": self.manifest_checksum,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the world size may differ, the data and order may not.

        Raises:
            ValueError: the state is malformed, or its seed, dataset (manifest checksum, length)
                or shuffle setting differs from this sampler's.
        """
        required = ("version", "seed", "epoch", "consumed", "global_batch_size", "num_samples")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks keys {missing}")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"sampler state version {state['version']!r}; this rangerdl reads {STATE_VERSION}"
            )
        for key in ("epoch", "consumed", "global_batch_size", "num_samples", "seed"):
            if not _is_int(state[key]) or state[key] < 0:
                raise ValueError(f"sampler state {key!r} must be an int >= 0, got {state[key]!r}")
        if state["seed"] != self.seed:
            raise ValueError(
                f"sampler state has seed {state['seed']}, this sampler {self.seed}: the order "
                "would differ; use the seed of the run being resumed"
            )
        saved = state.get("manifest_checksum")
        if saved and self.manifest_checksum and saved != self.manifest_checksum:
            raise ValueError(
                f"sampler state is for dataset {saved[:12]}..., this one is "
                f"{self.manifest_checksum[:12]}...: the data changed since the checkpoint"
            )
        if bool(saved) != bool(self.manifest_checksum):
            logger.warning("cannot check the dataset on resume: one side has no manifest_checksum")
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this dataset has "
                f"{self.num_samples}"
            )
        if state.get("shuffle", True) != self.shuffle:
            raise ValueError(
                f"sampler state has shuffle={state.get('shuffle')}, this {self.shuffle}"
            )
        if state["consumed"] > self.num_samples:
            raise ValueError(
                f"sampler state consumed {state['consumed']} > num_samples {self.num_samples}"
            )
        if state["global_batch_size"] != self.global_batch_size:
            logger.warning(
                "global batch size changed on resume (%d -> %d): continuing at sample %d of epoch "
                "%d, each sample still once per epoch, but batches differ from an uninterrupted run",
                state["global_batch_size"],
                self.global_batch_size,
                state["consumed"],
                state["epoch"],
            )
        if state.get("drop_last", self.drop_last) != self.drop_last:
            logger.warning(
                "drop_last changed on resume (%s -> %s): epochs end differently from the saved run",
                state.get("drop_last"),
                self.drop_last,
            )
        self._epoch, self._consumed = self._normalize(state["epoch"], state["consumed"])

    def __getstate__(self) -> dict[str, Any]:
        # Orders are rebuilt on demand; a file-backed one cannot (and need not) travel.
        state = self.__dict__.copy()
        state["_orders"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"GlobalBatchSampler(num_samples={self.num_samples}, global_batch_size="
            f"{self.global_batch_size}, rank={self.rank}, world_size={self.world_size}, "
            f"seed={self.seed}, epoch={self._epoch}, position={self.position})"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
