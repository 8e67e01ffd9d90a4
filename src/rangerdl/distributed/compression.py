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
so all hold the same mean (the owner takes its own chunk from its encoding: the same values).
Or every rank's payload goes to every rank (all-gather), each decodes and sums them all: ``W``
times the bytes of one phase of the other, so the same bytes at 2 ranks, where ``OuterSync``
uses it (no second encoding, a third less codec work). A ``topk`` payload is added into the sum
where it has values (a scatter-add of its size), and its encoding writes the error-feedback
residual the same way: no pass over every value beyond the selection itself.
Encoding and decoding are whole-tensor torch operations (no Python loop over blocks). An
encoding can give back the values its payload decodes to, bit for bit (error feedback keeps
the difference), and write into buffers the caller keeps.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from rangerdl._native import load_library
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

    @property
    def sparse(self) -> bool:
        """Whether a payload carries only some of its values (``topk``): decoding one into a
        sum (:meth:`decode` with ``add``) then costs its size, not a pass over every value."""
        return self.compression == "topk"

    def encode(
        self,
        x: Tensor,
        *,
        out: Tensor | None = None,
        dequantized: Tensor | None = None,
        residual: Tensor | None = None,
        scratch: Tensor | None = None,
    ) -> Tensor:
        """Encode each row of ``x``.

        Args:
            x: ``(rows, numel)`` float32.
            out: ``(rows, nbytes(numel))`` uint8 on ``x``'s device to write the payload into
                (default: a new tensor).
            dequantized: ``(rows, numel)`` float32 on ``x``'s device, not overlapping ``x``:
                receives what :meth:`decode` of the payload returns, bit for bit, from the
                values at hand instead of the packed bytes (error feedback keeps ``x`` minus
                it). Its contents are used as scratch space first.
            residual: ``(rows, numel)`` float32 on ``x``'s device, not overlapping ``x`` or
                ``dequantized``: receives ``x`` minus what :meth:`decode` of the payload
                returns, bit for bit (the error-feedback residual). ``topk`` writes it without
                the dense decoded values: ``x`` itself but at the values sent; there it may be
                ``x`` itself (the same tensor), which then becomes the residual in place.
            scratch: ``(rows, numel)`` float32 on ``x``'s device, overlapping none of the
                others, that the encoding may overwrite (default: ``dequantized``'s or
                ``residual``'s buffer, or a new tensor).

        Returns:
            The payload: ``out``, or a new ``(rows, nbytes(numel))`` uint8 tensor.
        """
        if x.dim() != 2 or x.dtype != torch.float32:
            raise ValueError(f"expected a 2-D float32 tensor, got {x.dtype} {tuple(x.shape)}")
        rows, numel = x.shape
        shape = (rows, self.nbytes(numel))
        if out is None:
            out = torch.empty(shape, dtype=torch.uint8, device=x.device)
        elif out.shape != shape or out.dtype != torch.uint8:
            raise ValueError(f"out must be {shape} uint8, got {out.dtype} {tuple(out.shape)}")
        if residual is x and (self.compression != "topk" or not x.is_contiguous()):
            raise ValueError(
                f"residual may be x itself with topk and a contiguous x only, not "
                f"{self.compression!r}"
            )
        given_buffers = (("dequantized", dequantized), ("residual", residual), ("scratch", scratch))
        for name, given in given_buffers:
            if given is not None and (given.shape != x.shape or given.dtype != torch.float32):
                raise ValueError(
                    f"{name} must be {tuple(x.shape)} float32, got "
                    f"{given.dtype} {tuple(given.shape)}"
                )
        if residual is not x:
            x = x.contiguous()
        if self.compression == "topk":
            self._encode_topk(x, out, dequantized, residual, scratch)
            return out
        # the decoded values, in the residual's buffer when they are not asked for
        decoded = dequantized if dequantized is not None else residual
        if self.compression in ("none", "bf16"):
            dtype = torch.float32 if self.compression == "none" else torch.bfloat16
            _write(out, x, dtype)
            if decoded is not None:
                decoded.copy_(_as(out, dtype))
        else:
            self._encode_quantized(x, out, decoded)
        if residual is not None and decoded is not None:
            torch.sub(x, decoded, out=residual)
        return out

    def decode(
        self, payload: Tensor, numel: int, *, out: Tensor | None = None, add: bool = False
    ) -> Tensor:
        """Decode each row of ``payload`` (from :meth:`encode` of ``numel`` values a row).

        Args:
            payload: ``(rows, nbytes(numel))`` uint8.
            numel: values a row.
            out: ``(rows, numel)`` float32 on ``payload``'s device to write into (default: a
                new tensor).
            add: add the decoded values to ``out`` (required) instead of writing them. A
                :attr:`sparse` payload adds only the values it carries: the others are left
                as they are (``out + 0`` would turn a ``-0.0`` into ``0.0``).

        Returns:
            ``(rows, numel)`` float32 on ``payload``'s device: ``out`` when given.
        """
        if payload.dim() != 2 or payload.shape[1] != self.nbytes(numel):
            raise ValueError(
                f"expected (rows, {self.nbytes(numel)}) bytes for {numel} values, "
                f"got {tuple(payload.shape)}"
            )
        shape = (payload.shape[0], numel)
        if out is None and add:
            raise ValueError(f"out must be the {shape} float32 sum to add into, got None")
        if out is None:
            out = torch.empty(shape, device=payload.device)
        elif out.shape != shape or out.dtype != torch.float32:
            raise ValueError(f"out must be {shape} float32, got {out.dtype} {tuple(out.shape)}")
        if add:
            if self.sparse:
                return self._decode_topk(payload, out, add=True)
            return out.add_(self.decode(payload, numel))
        if self.compression == "none":
            return out.copy_(_as(payload, torch.float32))
        if self.compression == "bf16":
            return out.copy_(_as(payload, torch.bfloat16))
        if self.compression == "topk":
            return self._decode_topk(payload, out)
        value_bytes = -(-numel * self.bits // 8)
        codes = payload[:, :value_bytes]  # int8: the codes themselves
        if self.bits != 8:
            codes = unpack_bits(codes, self.bits, numel)
        return self._dequantize(codes, _as(payload[:, value_bytes:], torch.float32), out)

    # ------------------------------------------------------------------ blockwise absmax
    def _blocks(self, x: Tensor) -> Tensor:
        """``(rows, blocks, block_size)``, the last block padded with zeros."""
        rows, numel = x.shape
        blocks = -(-numel // self.block_size)
        return _pad(x, blocks * self.block_size - numel).view(rows, blocks, self.block_size)

    def _scratch(self, blocks: Tensor, spare: Tensor | None) -> Tensor:
        """A float32 tensor of ``blocks``' shape: ``spare`` (``(rows, numel)``) when it has
        room for it without padding, else a new one."""
        if spare is not None and spare.is_contiguous() and spare.numel() == blocks.numel():
            return spare.view(blocks.shape)
        return torch.empty_like(blocks)

    def _encode_quantized(self, x: Tensor, out: Tensor, dequantized: Tensor | None) -> None:
        rows, numel = x.shape
        levels = self.levels
        blocks = self._blocks(x)
        work = self._scratch(blocks, dequantized)
        scale = torch.abs(blocks, out=work).amax(dim=2)  # (rows, blocks)
        inverse = torch.where(scale > 0, levels / scale, 0.0)
        q = torch.mul(blocks, inverse.unsqueeze(2), out=work).round_().clamp_(-levels, levels)
        value_bytes = -(-numel * self.bits // 8)
        if self.bits == 8:  # the codes are the value bytes: written in place
            codes = out[:, :numel]
        else:
            codes = torch.empty(rows, numel, dtype=torch.uint8, device=x.device)
        # q + L in [0, 2 L] through int8 (torch's float -> uint8 conversion is ~5x slower on
        # CPU), the + L in uint8 (wrapping, exact): the bytes of converting q + L itself, for
        # every q but NaN (x NaN, or a block scale so small that L / s overflows), whose
        # conversion is the platform's either way
        codes.view(torch.int8).copy_(q.view(rows, -1)[:, :numel])
        codes.add_(levels)
        if self.bits != 8:
            pack_bits(codes, self.bits, out=out[:, :value_bytes])
        _write(out[:, value_bytes:], scale, torch.float32)
        if dequantized is not None:
            self._dequantize(codes, scale, dequantized)

    def _dequantize(self, codes: Tensor, scale: Tensor, out: Tensor) -> Tensor:
        """``out`` <- ``(code - L) s / L``: ``codes`` ``(rows, numel)`` uint8, ``scale``
        ``(rows, blocks)`` float32, ``out`` ``(rows, numel)`` float32."""
        rows, numel = codes.shape
        size = scale.shape[1] * self.block_size
        values = out if size == numel and out.is_contiguous() else out.new_zeros(rows, size)
        values[:, :numel].copy_(codes)
        values[:, :numel].sub_(self.levels)
        values.view(rows, -1, self.block_size).mul_((scale / self.levels).unsqueeze(2))
        return out if values is out else out.copy_(values[:, :numel])

    # ------------------------------------------------------------------ top-k
    def _encode_topk(
        self,
        x: Tensor,
        out: Tensor,
        dequantized: Tensor | None,
        residual: Tensor | None,
        scratch: Tensor | None,
    ) -> None:
        rows = x.shape[0]
        blocks = self._blocks(x)
        kept = topk_per_chunk(self.block_size, self.topk_density)
        in_place = residual is x
        spare = scratch  # else a buffer written after
        if spare is None:
            spare = dequantized if dequantized is not None or in_place else residual
        magnitude = torch.abs(blocks, out=self._scratch(blocks, spare))
        positions = _largest(magnitude.view(torch.int32), kept)  # (rows, blocks, kept)
        taken = blocks.gather(2, positions)
        sent = taken.to(torch.bfloat16)
        value_bytes = 2 * sent.numel() // rows
        _write(out[:, :value_bytes], sent.view(rows, -1), torch.bfloat16)
        bits = index_bits(self.block_size)
        pack_bits(positions.view(rows, -1), bits, out=out[:, value_bytes:])
        if dequantized is not None:
            self._scatter_topk(sent.float(), positions, dequantized)
        if residual is not None:  # x - 0 is x bit for bit: only the sent values change
            base = residual if in_place else x
            self._scatter_topk(taken.sub_(sent.float()), positions, residual, base=base)

    def _decode_topk(self, payload: Tensor, out: Tensor, add: bool = False) -> Tensor:
        rows, numel = out.shape
        blocks = -(-numel // self.block_size)
        kept = topk_per_chunk(self.block_size, self.topk_density)
        value_bytes = 2 * blocks * kept
        values = _as(payload[:, :value_bytes], torch.bfloat16).float()
        positions = unpack_bits(
            payload[:, value_bytes:], index_bits(self.block_size), blocks * kept
        )
        positions = positions.long().view(rows, blocks, kept)
        values = values.view(rows, blocks, kept)
        return self._scatter_topk(values, positions, out, base=out if add else None, add=add)

    def _scatter_topk(
        self,
        values: Tensor,
        positions: Tensor,
        out: Tensor,
        *,
        base: Tensor | None = None,
        add: bool = False,
    ) -> Tensor:
        """``out`` (``(rows, numel)``) <- ``base`` (default zeros) but ``values`` at
        ``positions`` (both ``(rows, blocks, kept)``, positions within each block), or
        added to it there (``add``). ``base`` may be ``out``."""
        rows, numel = out.shape
        blocks = positions.shape[1]
        padded = numel != blocks * self.block_size or not out.is_contiguous()
        full = out if not padded else torch.empty(rows, blocks * self.block_size, device=out.device)
        if base is None:
            full.zero_()
        elif base is not full:  # and zeros in the padding (positions may fall in it)
            full[:, :numel].copy_(base)
            full[:, numel:].zero_()
        grid = full.view(rows, blocks, self.block_size)
        if add:
            grid.scatter_add_(2, positions, values)
        else:
            grid.scatter_(2, positions, values)
        return out.copy_(full[:, :numel]) if padded else out


def _largest(keys: Tensor, k: int) -> Tensor:
    """The positions of the ``k`` largest of each row of ``keys`` (``(..., n)`` int32, all
    ``>= 0``: the bits of magnitudes, which order as the magnitudes do, NaN above inf), as
    ``(..., k)`` int64 in no particular order; which of equal values are taken is unspecified.

    On CPU ``torch.topk`` costs a few microseconds per row whatever ``k``. For ``k <= 16``
    ``_topk_cpu.c`` (built on first use; its comment has the method) takes about a third of
    the time of the torch operations below, which are the path without a C compiler or with
    ``RANGERDL_CPU_KERNEL=0``: two rounds of ``k`` maxima. Cut each row into ``g`` groups (group
    ``j``: positions ``j, j + g, ...``; ``g`` divides ``n``, ``g >= k``). A value outside the
    ``k`` groups with the largest maxima is at most the ``k``-th largest maximum, so no larger
    than any of those ``k`` maxima: the ``k`` largest are among the ``k n / g`` values of
    those groups. Round one takes the ``k`` groups, round two the ``k`` largest of their values.
    """
    n = keys.shape[-1]
    rows = keys.reshape(-1, n)
    small = keys.device.type == "cpu" and keys.dtype == torch.int32 and k <= min(n, _ROUNDS_UP_TO)
    lib = _topk_kernel() if small else None
    if lib is not None:  # the same positions up to ties, in one pass per row
        rows = rows.contiguous()
        top = torch.empty(rows.shape[0], k, dtype=torch.int64)
        if lib.topk_rows(
            rows.data_ptr(), rows.shape[0], n, k, top.data_ptr(), torch.get_num_threads()
        ):
            raise MemoryError("top-k selection: no memory for a thread's candidates")
    elif k > _ROUNDS_UP_TO or keys.device.type != "cpu":
        top = rows.topk(k, dim=1, sorted=False).indices
    else:
        groups = _groups(n, k)
        per = n // groups
        maxima = rows.view(-1, per, groups).amax(dim=1)  # (rows, groups)
        chosen = _take_largest(maxima, k)  # (rows, k): the groups
        spread = torch.arange(0, n, groups, device=keys.device).view(1, per, 1)
        candidates = (chosen.unsqueeze(1) + spread).view(-1, per * k)  # their positions
        top = candidates.gather(1, _take_largest(rows.gather(1, candidates), k))
    return top.view(*keys.shape[:-1], k)


_ROUNDS_UP_TO = 16
"""The largest ``k`` for which :func:`_largest` takes maxima (or calls ``_topk_cpu.c``) rather
than calling ``torch.topk``."""
_TOPK_SOURCE = Path(__file__).with_name("_topk_cpu.c")


def _declare_topk(lib: ctypes.CDLL) -> None:
    lib.topk_rows.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_int]
    lib.topk_rows.restype = ctypes.c_int


def _topk_kernel() -> ctypes.CDLL | None:
    """``_topk_cpu.c`` (:func:`_largest` on CPU: the same positions up to ties, 2-3x faster),
    built on first use (:mod:`rangerdl._native`); ``None`` without a C compiler (one warning)
    or with ``RANGERDL_CPU_KERNEL=0``."""
    return load_library(
        _TOPK_SOURCE,
        _declare_topk,
        what="top-k compression",
        fallback="its selection takes torch operations (the same values, slower)",
    )


@functools.cache
def _groups(n: int, k: int) -> int:
    """The groups of :func:`_largest` for rows of ``n``: the divisor ``g >= k`` of ``n`` with the
    fewest columns to take maxima over, ``g`` in round one and ``k n / g`` in round two,
    counted twice (measured: it gathers its values first)."""
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    return min((g for g in divisors if g >= k), key=lambda g: (g + 2 * k * n // g, g))


def _take_largest(values: Tensor, k: int) -> Tensor:
    """The columns of the ``k`` largest of each row of ``values`` (``(rows, n)`` integers
    ``>= 0`` below ``2^31``), largest first; ties go to the higher column.

    ``k`` times the maximum, over keys ``(value << b) | column``: one ``amax`` gives the value
    and its column, which is then struck out.
    """
    rows, n = values.shape
    bits = max(1, (n - 1).bit_length())
    column = torch.arange(n, device=values.device)
    keys = values.long().bitwise_left_shift_(bits).bitwise_or_(column)
    flat, start = keys.view(-1), torch.arange(0, rows * n, n, device=values.device)
    top = []
    for _ in range(k):
        largest = keys.amax(dim=1).bitwise_and_((1 << bits) - 1)
        flat.index_fill_(0, largest + start, -1)
        top.append(largest)
    return torch.stack(top, dim=1)


def _pad(x: Tensor, extra: int) -> Tensor:
    """``x`` (rows, n) with ``extra`` zeros after each row (``x`` itself when none)."""
    return F.pad(x, (0, extra)) if extra else x


def _view(data: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The bytes ``data`` (``(rows, n)`` uint8) as ``dtype`` without a copy, or None where
    they are not aligned to it."""
    size = dtype.itemsize
    strides = data.stride()
    aligned = (
        strides[-1] == 1
        and data.shape[-1] % size == 0
        and data.storage_offset() % size == 0
        and all(stride % size == 0 for stride in strides[:-1])
    )
    return data.view(dtype) if aligned else None


def _as(data: Tensor, dtype: torch.dtype) -> Tensor:
    """The bytes ``data`` (``(rows, n)`` uint8) read as ``dtype``: a view, or an aligned copy
    where they are not aligned (a slice of a payload may start at any byte)."""
    view = _view(data, dtype)
    if view is not None:
        return view
    return data.clone(memory_format=torch.contiguous_format).view(dtype)


def _write(data: Tensor, values: Tensor, dtype: torch.dtype) -> None:
    """``data`` (``(rows, m size)`` uint8) <- the bytes of ``values`` (``(rows, m)``) as
    ``dtype`` (of ``size`` bytes)."""
    view = _view(data, dtype)
    if view is not None:
        view.copy_(values)
    else:
        data.copy_(values.to(dtype).contiguous().view(torch.uint8))


def pack_bits(values: Tensor, bits: int, *, out: Tensor | None = None) -> Tensor:
    """Pack each row of non-negative integers below ``2^bits`` into ``ceil(numel bits / 8)``
    bytes, the first value in the lowest bits.

    Args:
        values: ``(rows, numel)`` integers (any integer dtype).
        bits: bits per value, 1 to 24.
        out: ``(rows, ceil(numel bits / 8))`` uint8 to write into (default: a new tensor).

    Returns:
        The packed bytes: ``out`` when given.
    """
    rows, numel = values.shape
    if bits == 8:
        packed = values
    elif bits in (1, 2, 4) and sys.byteorder == "little":
        # Pairs of neighbours merged into one byte, s = bits, 2 bits, ... up to 8 bits a value:
        # a and b (s bits each) read as one little-endian int16 w = a | b << 8, the low byte of
        # w | w >> (8 - s) is a | b << s (contiguous ops: strided uint8 ops are ~20x slower)
        packed, s = _pad(values.to(torch.uint8), -numel % (8 // bits)), bits
        while s < 8:
            w = packed.contiguous().view(torch.int16)
            packed = w | w >> (8 - s)
            if s < 4:  # merged again: back to bytes
                packed = packed.to(torch.uint8)
            s *= 2
    elif 8 % bits == 0:  # 1, 2, 4: whole values per byte
        per = 8 // bits
        v = F.pad(values.to(torch.uint8), (0, -numel % per)).view(rows, -1, per)
        packed = v[:, :, 0].clone()
        for i in range(1, per):
            packed |= v[:, :, i] << (bits * i)
    else:  # any other width: through single bits (top-k positions: ceil(log2 block_size) bits)
        shifts = torch.arange(bits, device=values.device, dtype=torch.int64)
        single = (values.to(torch.int64).unsqueeze(2) >> shifts & 1).view(rows, -1)
        single = F.pad(single.to(torch.uint8), (0, -single.shape[1] % 8)).view(rows, -1, 8)
        weights = torch.tensor([1 << i for i in range(8)], device=values.device, dtype=torch.uint8)
        packed = (single * weights).sum(dim=2, dtype=torch.int32)
    # the conversion to uint8 keeps the low byte of each word
    return packed.to(torch.uint8) if out is None else out.copy_(packed)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The inverse of :func:`pack_bits`: ``(rows, numel)`` values (uint8 for ``bits <= 8``,
    else int32)."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :numel].contiguous()
    if bits in (1, 2, 4) and sys.byteorder == "little":
        # the inverse of pack_bits' merges: a byte p = a | b << s as the int16 p | p << (8 - s),
        # masked, holds a in its low byte and b in its high one
        codes, s = packed, 4
        while s >= bits:
            w = codes.to(torch.int16, memory_format=torch.contiguous_format)
            w |= w << (8 - s)
            codes = w.bitwise_and_(((1 << s) - 1) * 0x0101).view(torch.uint8)
            s //= 2
        return codes[:, :numel] if codes.shape[1] != numel else codes
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (bits * i)) & mask for i in range(per)]
        return torch.stack(parts, dim=2).view(rows, -1)[:, :numel].contiguous()
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    single = ((packed.unsqueeze(2) >> shifts) & 1).view(rows, -1)[:, : numel * bits]
    weights = torch.tensor([1 << i for i in range(bits)], device=packed.device, dtype=torch.int32)
    return (single.view(rows, numel, bits).to(torch.int32) * weights).sum(dim=2, dtype=torch.int32)


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
    rank: int | None = None,
    own: Tensor | None = None,
    out: Tensor | None = None,
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
        rank: this rank's place in the collectives' group. With the all-to-all (the chunk it
            owns) its chunk of the mean is then what its encoding gave back (the same values
            the gathered bytes decode to), and only the others' chunks are decoded; with the
            all-gather and ``own``, its own payload is not decoded. Default: all are decoded.
        own: with the all-gather and ``rank``: ``(W, chunk)`` fp32 on ``device``, what this
            rank's payload decodes to (:meth:`Codec.encode`'s ``dequantized``). Not used
            with a :attr:`~Codec.sparse` codec, whose own payload is added as cheaply.
        out: ``(W * chunk,)`` contiguous float32 on ``device`` to write the mean into
            (default: a new tensor).

    Returns:
        ``(W * chunk,)`` float32 on ``device``, identical on every rank: ``out`` when given.
    """
    rows, width = payload.shape
    assert rows == world_size and width == codec.nbytes(chunk), (payload.shape, chunk)
    if out is None:
        out = torch.empty(world_size * chunk, device=device)
    if mode == "all_gather":
        gathered = torch.empty(world_size * rows, width, dtype=torch.uint8, device=payload.device)
        run(release.all_gather_single, gathered, payload)
        gathered = gathered.to(device).view(world_size, rows, width)
        # the ranks' values added in rank order (the same sums on every rank), this rank's as
        # its encoding gave them back; a sparse payload's are added where it has them (its
        # own too: cheaper than a dense add, and every rank then adds alike)
        acc = out.view(rows, chunk)
        if own is not None and rank is not None and not codec.sparse:
            own = own.view(rows, chunk)
            if world_size == 2:  # two terms commute exactly: the other's decoded into ``out``
                codec.decode(gathered[1 - rank], chunk, out=acc)
                return out.add_(own.view(-1)).div_(world_size)
        else:
            own = None
        for j in range(world_size):
            if j == rank and own is not None and j == 0:
                acc.copy_(own)
            elif j == rank and own is not None:
                acc.add_(own)
            else:
                codec.decode(gathered[j], chunk, out=acc, add=j > 0)
        return out.div_(world_size)
    if mode != "all_to_all":
        raise ValueError(f"mode must be all_gather or all_to_all, got {mode!r}")
    received = torch.empty_like(payload)
    run(dist.all_to_all_single, received, payload)
    chunks = out.view(world_size, chunk)  # the decoded chunks first, then the mean's
    mine = codec.decode(received.to(device), chunk, out=chunks).sum(dim=0, keepdim=True)
    mine.div_(world_size)
    if mean_residual is not None:
        mine.add_(mean_residual)
    own = None  # this rank's chunk of the mean as its encoding gives it back
    if rank is not None:
        own = chunks[rank : rank + 1]
    elif mean_residual is not None:
        own = torch.empty_like(mine)
    encoded = codec.encode(mine, dequantized=own)
    if mean_residual is not None and own is not None:
        torch.sub(mine, own, out=mean_residual.view(1, -1))
    encoded = encoded.to(payload.device)
    gathered = torch.empty_like(payload)
    run(release.all_gather_single, gathered, encoded)
    gathered = gathered.to(device)
    if rank is None:
        codec.decode(gathered, chunk, out=chunks)
    else:  # the chunks before this rank's and after it
        for lo, hi in ((0, rank), (rank + 1, world_size)):
            if hi > lo:
                codec.decode(gathered[lo:hi], chunk, out=chunks[lo:hi])
    return out
