"""Bytes on the wire and seconds for the collectives rangerdl uses (no torch import).

Bytes. Ring all-reduce of ``n`` values of ``b`` bytes over ``W`` ranks: a reduce-scatter then an
all-gather, each rank sending ``(W-1)/W * n * b`` bytes in each, so ``2 (W-1)/W * n * b`` in all
(Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC
2009; the model NCCL's and gloo's ring algorithms follow). Reduce-scatter or all-gather alone (and
all-to-all of equal shards) send half of that.

Seconds. The latency-bandwidth (Hockney, "alpha-beta") model of Thakur, Rabenseifner and Gropp,
"Optimization of collective communication operations in MPICH", IJHPCA 19(1), 2005, section 2:
sending ``m`` bytes costs ``alpha + m beta``, with ``alpha`` the per-message latency and ``beta``
the seconds per byte of one node's link. The ring all-reduce is ``2 (W-1)`` rounds of one message of
``n b / W`` bytes each, every node sending and receiving at once (full-duplex links)::

    T_allreduce = 2 (W-1) alpha + 2 (W-1)/W * n b * beta
    T_reduce_scatter = T_all_gather = T_all_to_all = (W-1) alpha + (W-1)/W * n b * beta
    T_broadcast (binomial tree) = ceil(log2 W) (alpha + n b beta)

``beta = 8 / (bandwidth_bits_per_s * efficiency)``: ``efficiency`` is the share of the wire's bytes
that is payload. TCP over Ethernet at MTU 1500 with TCP timestamps carries 1448 payload bytes per
1538 bytes on a physical wire (frame 1514 + preamble 8 + inter-frame gap 12 + FCS 4 are counted
differently by NICs; 1448/1538 = 0.94), or per 1514 bytes where a Linux qdisc counts (``tc tbf``,
as in ``benchmarks/netsim``: 0.956). The model leaves out what a real job adds: waiting for the
slowest rank (compute skew), TCP slow start after an idle link, and contention with other traffic;
it is a lower bound that the netsim measurements exceed by 2-9% for a 10 MB all-reduce
(``benchmarks/plan_check.py``).

Compressed payloads (``[distributed] compression``, :mod:`rangerdl.distributed.compression`).
A sync's ``n`` values are cut into ``W`` chunks of ``c = ceil(n / W)`` values; each chunk is
encoded into ``P(c)`` bytes (:func:`payload_bytes`, ``B`` = ``block_size``)::

    bf16:                P = 2 c
    int8 / int4 / int2:  P = ceil(c b / 8) + 4 ceil(c / B)         b = 8, 4, 2 bits; fp32 scales
    topk:                P = nb kc 2 + ceil(nb kc i / 8)           nb = ceil(c / B) chunks,
                         kc = max(1, ceil(density B)) values each (bf16), i = ceil(log2 B) bits
                         per position

Exchange: an all-to-all sends chunk ``j`` of every rank to rank ``j`` (``(W-1) P`` bytes sent per
rank), which decodes, sums in fp32 and all-gathers its encoded mean chunk (``(W-1) P``): ``2 (W-1)
P`` per rank and sync. An all-gather of every rank's ``W`` chunks (``(W-1) W P``) sends as much at
``W = 2`` and more beyond, in one round instead of two and without the second encoding;
``benchmarks/compression.py`` times both. The sync uses the all-to-all at every ``W``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rangerdl.distributed.options import COMPRESSIONS

__all__ = [
    "ETHERNET_EFFICIENCY",
    "QUANT_BITS",
    "SCALE_BYTES",
    "TBF_EFFICIENCY",
    "Link",
    "all_gather_time",
    "allreduce_time",
    "broadcast_time",
    "compressed_sync_bytes",
    "compressed_sync_time",
    "index_bits",
    "payload_bytes",
    "ring_bytes",
    "topk_per_chunk",
]

QUANT_BITS = {"int8": 8, "int4": 4, "int2": 2}
"""Bits per value of the blockwise absmax payloads."""
SCALE_BYTES = 4
"""Bytes per block scale (fp32)."""

ETHERNET_EFFICIENCY = 1448 / 1538
"""TCP payload per byte on a physical Ethernet wire (MTU 1500, TCP timestamps)."""
TBF_EFFICIENCY = 1448 / 1514
"""TCP payload per byte counted by a Linux qdisc such as ``tc tbf`` (Ethernet header, no preamble)."""


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


@dataclass(frozen=True)
class Link:
    """One node's network link: ``bandwidth_bps`` bits per second in each direction, ``latency_s``
    per message (alpha: one-way network latency plus the library's per-message overhead), and the
    payload ``efficiency`` (see the module docstring)."""

    bandwidth_bps: float
    latency_s: float = 0.0
    efficiency: float = ETHERNET_EFFICIENCY

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise ValueError(f"bandwidth must be > 0 bits/s, got {self.bandwidth_bps}")
        if self.latency_s < 0:
            raise ValueError(f"latency must be >= 0 s, got {self.latency_s}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")

    @property
    def seconds_per_byte(self) -> float:
        """beta: seconds per payload byte."""
        return 8.0 / (self.bandwidth_bps * self.efficiency)


def allreduce_time(numel: int, element_size: int, world_size: int, link: Link) -> float:
    """Ring all-reduce: ``2 (W-1) alpha + 2 (W-1)/W n b beta`` seconds (0 for one rank)."""
    sent = ring_bytes(numel, element_size, world_size)
    return 2 * (world_size - 1) * link.latency_s + sent * link.seconds_per_byte


def all_gather_time(numel: int, element_size: int, world_size: int, link: Link) -> float:
    """Ring all-gather, reduce-scatter or all-to-all of ``numel`` values in all:
    ``(W-1) alpha + (W-1)/W n b beta`` seconds."""
    sent = ring_bytes(numel, element_size, world_size, factor=1.0)
    return (world_size - 1) * link.latency_s + sent * link.seconds_per_byte


def broadcast_time(numel: int, element_size: int, world_size: int, link: Link) -> float:
    """Binomial-tree broadcast: ``ceil(log2 W) (alpha + n b beta)`` seconds."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    rounds = math.ceil(math.log2(world_size)) if world_size > 1 else 0
    return rounds * (link.latency_s + numel * element_size * link.seconds_per_byte)


def topk_per_chunk(block_size: int, density: float) -> int:
    """Values ``topk`` sends per chunk of ``block_size``: ``max(1, ceil(density * block_size))``."""
    return min(block_size, max(1, math.ceil(density * block_size)))


def index_bits(block_size: int) -> int:
    """Bits of one position within a chunk of ``block_size`` values: ``ceil(log2 block_size)``
    (at least 1)."""
    return max(1, (block_size - 1).bit_length())


def payload_bytes(
    compression: str, numel: int, block_size: int = 256, topk_density: float = 0.03
) -> int:
    """Bytes of ``numel`` values encoded as ``compression`` (the module docstring's ``P``).

    Raises:
        ValueError: an unknown ``compression``.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
        )
    if compression == "none":
        return 4 * numel
    if compression == "bf16":
        return 2 * numel
    blocks = -(-numel // block_size)
    if compression == "topk":
        kept = blocks * topk_per_chunk(block_size, topk_density)
        return 2 * kept + -(-kept * index_bits(block_size) // 8)
    bits = QUANT_BITS[compression]
    return -(-numel * bits // 8) + SCALE_BYTES * blocks


def compressed_sync_bytes(
    compression: str,
    numel: int,
    world_size: int,
    block_size: int = 256,
    topk_density: float = 0.03,
    *,
    mode: str = "all_to_all",
) -> int:
    """Bytes one rank hands to the collectives in one compressed sync of ``numel`` values (the
    module docstring): ``2 (W-1) P`` (``all_to_all`` then all-gather, the sync's exchange) or
    ``(W-1) W P`` (``all_gather``)."""
    chunk = -(-numel // world_size)
    per_chunk = payload_bytes(compression, chunk, block_size, topk_density)
    if mode == "all_gather":
        return (world_size - 1) * world_size * per_chunk
    return 2 * (world_size - 1) * per_chunk


def compressed_sync_time(
    compression: str,
    numel: int,
    world_size: int,
    link: Link,
    block_size: int = 256,
    topk_density: float = 0.03,
) -> float:
    """Seconds on the wire of one compressed sync as ``OuterSync`` runs it: an all-to-all and
    an all-gather of ``W P`` bytes each, or at 2 ranks one all-gather of every rank's ``W P``
    (the same bytes, one latency less)."""
    chunk = -(-numel // world_size)
    per_chunk = payload_bytes(compression, chunk, block_size, topk_density)
    if world_size == 2:
        return all_gather_time(world_size * world_size * per_chunk, 1, world_size, link)
    return 2 * all_gather_time(world_size * per_chunk, 1, world_size, link)
