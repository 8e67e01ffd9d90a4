"""Compressed pseudo-gradients for the outer sync: encode, exchange, decode and sum in fp32.

Payloads (``[distributed] compression``; sizes in :func:`rangerdl.distributed.cost.payload_bytes`):

- ``bf16``: each value rounded to bfloat16.
- ``int8``, ``int4``, ``int2``: blockwise absmax quantization. Per block of ``B`` values the scale
  ``s = max |x|`` (fp32) and per value ``q = round(x L / s)`` in ``[-L, L]``, ``L = 2^(b-1) - 1``
  (127, 7, 1; int2 is ternary), stored as ``q + L`` in ``b`` unsigned bits; decoded
  ``x' = q s / L``, so ``|x - x'| <= s / (2 L)`` up to fp32 rounding. Blockwise scales as in
  Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022); integer
  pseudo-gradients as INTELLECT-1 (int8) and Streaming DiLoCo (Douillard et al. 2025, 4 bits,
  summed in fp32); uniform levels over a norm as QSGD (Alistarh et al. 2017), here rounded to
  nearest rather than stochastically, the error being fed back instead.
- ``topk``: per chunk of ``B`` values the ``kc = max(1, ceil(density B))`` of largest magnitude
  (SparseLoCo, Sarfi et al. 2025, arXiv 2508.15706: chunk-wise top-k with error feedback), each
  sent as a bf16 value and its position in the chunk in ``ceil(log2 B)`` bits.

Layout of one encoded chunk of ``c`` values (one row of a ``uint8`` tensor): the values (bf16
bytes, or the ``b``-bit codes packed little-end first, ``8 / b`` per byte), then the fp32 block
scales (quantizers) or the packed positions (``topk``). Every payload travels as ``uint8``, which
gloo and NCCL both all-gather and all-to-all (gloo has no int16/uint16 collectives).

The exchange (:func:`exchange_mean`) never adds encoded values in their own dtype: each rank
decodes what it receives and sums in fp32; the owner of a chunk (the all-to-all sends chunk ``j``
to rank ``j``) encodes the mean again for the all-gather, and every rank decodes the same bytes,
so all hold the same mean.
Encoding and decoding are whole-tensor torch operations (no Python loop over blocks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from rangerdl.distributed import release
from rangerdl.distributed.cost import (
    QUANT_BITS,
    index_bits,
    payload_bytes,
    topk_per_chunk,
)
from rangerdl.distributed.options import COMPRESSIONS

__all__ = ["Codec", "exchange_mean", "pack_bits", "unpack_bits"]


class Codec:
    """Encodes rows of fp32 values into rows of bytes and back.

    Args:
        compression: one of :data:`~rangerdl.distributed.options.COMPRESSIONS` (``none``: the fp32
            bytes themselves, lossless).
        block_size: values per block (quantizers) or chunk (``topk``).
        topk_density: ``topk``: the share of each chunk kept.

    Raises:
        ValueError: an unknown ``compression`` or a ``block_size``/``topk_density`` out of range.
    """

    def __init__(self, compression: str, block_size: int = 256, topk_density: float = 0.03) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0.0 < topk_density <= 1.0:
            raise ValueError(f"topk_density must be in (0, 1], got {topk_density}")
        self.compression = compression
        self.block_size = block_size
        self.topk_density = topk_density
        self.bits = QUANT_BITS.get(compression, 0)
        self.levels = (1 << (self.bits - 1)) - 1 if self.bits else 0

    def nbytes(self, numel: int) -> int:
        """Bytes of one encoded row of ``numel`` values."""
        return payload_bytes(self.compression, numel, self.block_size, self.topk_density)

    def encode(self, x: Tensor) -> Tensor:
        """Encode each row of ``x``.

        Args:
            x: ``(rows, numel)`` float32.

        Returns:
            ``(rows, nbytes(numel))`` uint8 on ``x``'s device.
        """
        if x.dim() != 2 or x.dtype != torch.float32:
            raise ValueError(f"expected a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        if self.compression == "none":
            out = x.view(torch.uint8).clone()
        elif self.compression == "bf16":
            out = x.to(torch.bfloat16).view(torch.uint8)
        elif self.compression == "topk":
            out = self._encode_topk(x)
        else:
            out = self._encode_quantized(x)
        assert out.shape[1] == self.nbytes(x.shape[1]), (out.shape, self.compression)
        return out

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """Decode each row of ``payload`` (from :meth:`encode` of ``numel`` values a row).

        Returns:
            ``(rows, numel)`` float32 on ``payload``'s device.
        """
        if payload.dim() != 2 or payload.shape[1] != self.nbytes(numel):
            raise ValueError(
                f"expected (rows, {self.nbytes(numel)}) bytes for {numel} values, "
                f"got {tuple(payload.shape)}"
            )
        if self.compression == "none":
            return _as(payload, torch.float32)
        if self.compression == "bf16":
            return _as(payload, torch.bfloat16).float()
        if self.compression == "topk":
            return self._decode_topk(payload, numel)
        return self._decode_quantized(payload, numel)

    # ------------------------------------------------------------------ blockwise absmax
    def _blocks(self, x: Tensor) -> Tensor:
        """``(rows, blocks, block_size)``, the last block padded with zeros."""
        rows, numel = x.shape
        blocks = -(-numel // self.block_size)
        return _pad(x, blocks * self.block_size - numel).view(rows, blocks, self.block_size)

    def _encode_quantized(self, x: Tensor) -> Tensor:
        rows, numel = x.shape
        blocks = self._blocks(x)
        scale = blocks.abs().amax(dim=2)  # (rows, blocks)
        inverse = torch.where(scale > 0, self.levels / scale, torch.zeros_like(scale))
        codes = (blocks * inverse.unsqueeze(2)).round_().clamp_(-self.levels, self.levels)
        # float -> int16 -> uint8: torch's direct float -> uint8 conversion is ~5x slower on CPU
        codes = codes.add_(self.levels).to(torch.int16).to(torch.uint8).view(rows, -1)
        codes = codes[:, :numel] if codes.shape[1] != numel else codes
        return torch.cat([pack_bits(codes, self.bits), scale.view(torch.uint8)], dim=1)

    def _decode_quantized(self, payload: Tensor, numel: int) -> Tensor:
        rows = payload.shape[0]
        value_bytes = -(-numel * self.bits // 8)
        codes = unpack_bits(payload[:, :value_bytes], self.bits, numel)
        scale = _as(payload[:, value_bytes:], torch.float32)  # (rows, blocks)
        blocks = scale.shape[1]
        values = _pad(codes.float().sub_(self.levels), blocks * self.block_size - numel)
        values = values.view(rows, blocks, self.block_size).mul_((scale / self.levels).unsqueeze(2))
        values = values.view(rows, -1)
        return values[:, :numel].contiguous() if values.shape[1] != numel else values

    # ------------------------------------------------------------------ top-k
    def _encode_topk(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        blocks = self._blocks(x)
        kept = topk_per_chunk(self.block_size, self.topk_density)
        positions = blocks.abs().topk(kept, dim=2, sorted=False).indices  # (rows, blocks, kept)
        values = blocks.gather(2, positions).to(torch.bfloat16).view(rows, -1)
        packed = pack_bits(positions.view(rows, -1), index_bits(self.block_size))
        return torch.cat([values.view(torch.uint8), packed], dim=1)

    def _decode_topk(self, payload: Tensor, numel: int) -> Tensor:
        rows = payload.shape[0]
        blocks = -(-numel // self.block_size)
        kept = topk_per_chunk(self.block_size, self.topk_density)
        value_bytes = 2 * blocks * kept
        values = _as(payload[:, :value_bytes], torch.bfloat16).float()
        positions = unpack_bits(
            payload[:, value_bytes:], index_bits(self.block_size), blocks * kept
        )
        out = torch.zeros(rows, blocks, self.block_size, device=payload.device)
        out.scatter_(2, positions.long().view(rows, blocks, kept), values.view(rows, blocks, kept))
        return out.view(rows, -1)[:, :numel].contiguous()


def _pad(x: Tensor, extra: int) -> Tensor:
    """``x`` (rows, n) with ``extra`` zeros after each row (``x`` itself when none)."""
    return F.pad(x, (0, extra)) if extra else x


def _as(data: Tensor, dtype: torch.dtype) -> Tensor:
    """The bytes ``data`` (``(rows, n)`` uint8) read as ``dtype``, through an aligned copy (a
    slice of a payload may start at any byte)."""
    return data.clone(memory_format=torch.contiguous_format).view(dtype)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack each row of non-negative integers below ``2^bits`` into ``ceil(numel bits / 8)``
    bytes, the first value in the lowest bits.

    Args:
        values: ``(rows, numel)`` integers (any integer dtype).
        bits: bits per value, 1 to 24.
    """
    rows, numel = values.shape
    if bits == 8:
        return values.to(torch.uint8)
    if bits in _WORDS and sys.byteorder == "little":
        # The per = 8 / bits codes of one byte, read as one little-endian word w (code i in
        # byte i), land in place with w | w >> (8 - bits) | w >> 2 (8 - bits) ...; the low byte
        # is the packed one (contiguous ops: strided uint8 ops are ~20x slower).
        per, word = 8 // bits, _WORDS[bits]
        v = _pad(values.to(torch.uint8), -numel % per).contiguous().view(word)
        out = v.clone()
        for i in range(1, per):
            out |= v >> ((8 - bits) * i)
        return out.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4: whole values per byte
        per = 8 // bits
        v = F.pad(values.to(torch.uint8), (0, -numel % per)).view(rows, -1, per)
        out = v[:, :, 0].clone()
        for i in range(1, per):
            out |= v[:, :, i] << (bits * i)
        return out
    # any other width: through single bits (positions of top-k: ceil(log2 block_size) bits)
    shifts = torch.arange(bits, device=values.device, dtype=torch.int64)
    single = (values.to(torch.int64).unsqueeze(2) >> shifts & 1).view(rows, -1).to(torch.uint8)
    single = F.pad(single, (0, -single.shape[1] % 8)).view(rows, -1, 8)
    weights = torch.tensor([1 << i for i in range(8)], device=values.device, dtype=torch.uint8)
    return (single * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The inverse of :func:`pack_bits`: ``(rows, numel)`` values (uint8 for ``bits <= 8``,
    else int32)."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :numel].contiguous()
    if bits in _WORDS and sys.byteorder == "little":
        # the inverse of pack_bits' word trick: byte i of a word holds code i
        per, word = 8 // bits, _WORDS[bits]
        w = packed.to(word)
        out = w.clone()
        for i in range(1, per):
            out |= w << ((8 - bits) * i)
        mask = sum(((1 << bits) - 1) << (8 * i) for i in range(per))
        codes = out.bitwise_and_(mask).view(torch.uint8).view(rows, -1)
        return codes[:, :numel] if codes.shape[1] != numel else codes
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(per)]
        return torch.stack(parts, dim=2).view(rows, -1)[:, :numel].contiguous()
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    single = ((packed.unsqueeze(2) >> shifts) & 1).view(rows, -1)[:, : numel * bits]
    weights = torch.tensor([1 << i for i in range(bits)], device=packed.device, dtype=torch.int32)
    return (single.view(rows, numel, bits).to(torch.int32) * weights).sum(dim=2, dtype=torch.int32)


_WORDS = {4: torch.int16, 2: torch.int32}
"""The integer word that holds one packed byte's codes, one per byte (``pack_bits``)."""

Collective = Callable[..., None]
"""``run(fn, *tensors, **kwargs)``: issues the blocking collective ``fn(*tensors, group=...,
**kwargs)`` and returns once its tensors are free (see :func:`blocking_on`)."""


def blocking_on(group: Any) -> Collective:
    """A :data:`Collective` on ``group`` through :func:`rangerdl.distributed.release.blocking`."""

    def run(fn: Any, *tensors: Tensor, **kwargs: Any) -> None:
        release.blocking(fn, tensors, *tensors, group=group, **kwargs)

    return run


def exchange_mean(
    codec: Codec,
    payload: Tensor,
    chunk: int,
    world_size: int,
    run: Collective,
    *,
    device: torch.device,
    mean_residual: Tensor | None = None,
    mode: str = "all_to_all",
) -> Tensor:
    """The ranks' mean of what they encoded, decoded and summed in fp32.

    Args:
        codec: the payload's codec.
        payload: ``(W, codec.nbytes(chunk))`` uint8 on the communication device: this rank's
            values cut into ``W`` chunks of ``chunk`` values, each encoded.
        chunk: values per chunk.
        world_size: ``W``.
        run: issues a blocking collective (:func:`blocking_on`).
        device: where decoding and the fp32 sum run.
        mean_residual: with the all-to-all, error feedback on the re-encoded mean: ``(chunk,)``
            fp32 on ``device``, what this rank's last encoding of its mean chunk lost; added
            before encoding and replaced by this encoding's loss (in place). Unused by the
            all-gather, which encodes nothing again.
        mode: ``all_to_all`` (chunk ``j`` to rank ``j``, decoded and summed there, the mean
            encoded again and all-gathered) or ``all_gather`` (every rank's chunks to every rank,
            decoded and summed by each; ``W`` times the bytes of one phase of the other).

    Returns:
        ``(W * chunk,)`` float32 on ``device``, identical on every rank.
    """
    rows, width = payload.shape
    assert rows == world_size and width == codec.nbytes(chunk), (payload.shape, chunk)
    if mode == "all_gather":
        gathered = torch.empty(world_size * rows, width, dtype=torch.uint8, device=payload.device)
        run(release.all_gather_single, gathered, payload)
        decoded = codec.decode(gathered.to(device), chunk).view(world_size, rows * chunk)
        return decoded.sum(dim=0).div_(world_size)
    if mode != "all_to_all":
        raise ValueError(f"mode must be all_gather or all_to_all, got {mode!r}")
    received = torch.empty_like(payload)
    run(dist.all_to_all_single, received, payload)
    mine = codec.decode(received.to(device), chunk).sum(dim=0, keepdim=True).div_(world_size)
    if mean_residual is not None:
        mine.add_(mean_residual)
    encoded = codec.encode(mine)
    if mean_residual is not None:
        mean_residual.copy_(mine.sub_(codec.decode(encoded, chunk)).view(-1))
    encoded = encoded.to(payload.device)
    gathered = torch.empty_like(payload)
    run(release.all_gather_single, gathered, encoded)
    return codec.decode(gathered.to(device), chunk).view(-1)
