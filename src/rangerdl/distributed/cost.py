"""Bytes on the wire for the collectives rangerdl uses (no torch import).

Ring all-reduce of ``n`` values of ``b`` bytes over ``W`` ranks: a reduce-scatter then an
all-gather, each rank sending ``(W-1)/W * n * b`` bytes in each, so ``2 (W-1)/W * n * b`` in all
(Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC
2009; the model NCCL's and gloo's ring algorithms follow). Reduce-scatter or all-gather alone (and
all-to-all of equal shards) send half of that.
"""

from __future__ import annotations

__all__ = ["ring_bytes"]


def ring_bytes(numel: int, element_size: int, world_size: int, *, factor: float = 2.0) -> int:
    """Bytes one rank sends: ``factor * (W-1)/W * numel * element_size``.

    Args:
        numel: values in the collective (the whole tensor, not a shard).
        element_size: bytes per value (4 for fp32, 2 for bf16).
        world_size: ranks in the process group (W >= 1; 1 sends nothing).
        factor: 2 for all-reduce; 1 for reduce-scatter, all-gather or all-to-all.

    Returns:
        bytes, rounded down to an int.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return int(factor * (world_size - 1) / world_size * numel * element_size)
