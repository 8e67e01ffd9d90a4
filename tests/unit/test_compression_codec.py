"""The codecs of compressed pseudo-gradients, their sizes, and the options that choose them."""

from __future__ import annotations

import math

import pytest
import torch

from rangerdl.distributed import SyncOptions
from rangerdl.distributed.compression import (
    Codec,
    _largest,
    _topk_kernel,
    pack_bits,
    unpack_bits,
)
from rangerdl.distributed.cost import (
    Link,
    compressed_sync_bytes,
    compressed_sync_time,
    index_bits,
    payload_bytes,
    topk_per_chunk,
)
from rangerdl.train.config import load_config

QUANTIZERS = ("int8", "int4", "int2")
PAYLOADS = ("none", "bf16", *QUANTIZERS, "topk")


def _sample(rows: int, numel: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** torch.randint(-4, 2, (rows, numel), generator=gen)
    return torch.randn(rows, numel, generator=gen) * magnitude


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 9, 13, 20])
def test_pack_bits_round_trips(bits: int) -> None:
    values = torch.randint(0, 1 << bits, (3, 29), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(29 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 29).long(), values)


def test_int4_layout_by_hand() -> None:
    """x = [1, -1, 0.5, 0], one block of 4: scale 1, L = 7, codes round(7 x) + 7 = [14, 0, 11, 7]
    (3.5 rounds to even, 4), two per byte low nibble first: [14, 11 + 16 * 7]; then the scale's
    fp32 bytes (1.0 = 0x3f800000, little-endian)."""
    payload = Codec("int4", block_size=4).encode(torch.tensor([[1.0, -1.0, 0.5, 0.0]]))
    assert payload.tolist() == [[14, 11 + 16 * 7, 0x00, 0x00, 0x80, 0x3F]]
    decoded = Codec("int4", block_size=4).decode(payload, 4)
    assert torch.allclose(decoded, torch.tensor([[1.0, -1.0, 4 / 7, 0.0]]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize(("numel", "block"), [(1, 256), (5, 4), (257, 256), (1000, 64), (77, 7)])
def test_quantizer_error_is_within_half_a_step_per_block(name: str, numel: int, block: int) -> None:
    """|x - dq(q(x))| <= s / (2 L) for every value, s the absmax of its block, L = 2^(b-1) - 1
    (round to nearest), up to fp32 rounding of x L / s."""
    codec = Codec(name, block_size=block)
    x = _sample(3, numel)
    err = (x - codec.decode(codec.encode(x), numel)).abs()
    blocks = math.ceil(numel / block)
    padded = torch.nn.functional.pad(x, (0, blocks * block - numel)).view(3, blocks, block)
    scale = padded.abs().amax(dim=2, keepdim=True).expand_as(padded).reshape(3, -1)[:, :numel]
    levels = 2 ** (codec.bits - 1) - 1
    assert (err <= scale / (2 * levels) * (1 + 1e-5)).all()
    if name == "int2":  # ternary: every decoded value is 0 or +-s
        dq = codec.decode(codec.encode(x), numel)
        assert ((dq == 0) | torch.isclose(dq.abs(), scale)).all()


def test_bf16_is_torch_rounding_and_none_is_lossless() -> None:
    x = _sample(2, 300)
    assert torch.equal(Codec("bf16").decode(Codec("bf16").encode(x), 300), x.bfloat16().float())
    assert torch.equal(Codec("none").decode(Codec("none").encode(x), 300), x)


@pytest.mark.parametrize(
    ("numel", "block", "density"), [(1000, 64, 0.03), (5, 256, 0.03), (9, 4, 0.5)]
)
def test_topk_keeps_the_largest_of_each_chunk(numel: int, block: int, density: float) -> None:
    codec = Codec("topk", block_size=block, topk_density=density)
    x = _sample(2, numel, seed=3)
    dq = codec.decode(codec.encode(x), numel)
    kept = topk_per_chunk(block, density)
    for row in range(2):
        for start in range(0, numel, block):
            chunk, got = x[row, start : start + block], dq[row, start : start + block]
            nonzero = got != 0
            assert int(nonzero.sum()) <= kept
            assert torch.equal(got[nonzero], chunk[nonzero].bfloat16().float())
            if int(nonzero.sum()) < chunk.numel():  # nothing dropped is larger than what was sent
                assert chunk[~nonzero].abs().max() <= chunk[nonzero].abs().min()


@pytest.mark.parametrize("name", PAYLOADS[1:])
def test_error_feedback_identity_sent_plus_kept_is_the_input(name: str) -> None:
    """What a rank keeps is input - decoded payload; sent + kept gives the input back to fp32
    rounding, and over rounds the sum of what was sent tracks the sum of the inputs within one
    residual (nothing is lost for good)."""
    codec = Codec(name, block_size=16, topk_density=0.1)
    kept = torch.zeros(1, 200)
    sent_total, input_total = torch.zeros(1, 200), torch.zeros(1, 200)
    for round_ in range(20):
        x = _sample(1, 200, seed=round_) * 1e-2
        corrected = x + kept
        sent = codec.decode(codec.encode(corrected), 200)
        kept = corrected - sent
        assert torch.allclose(sent + kept, corrected, rtol=1e-6, atol=1e-9)
        sent_total += sent
        input_total += x
    assert torch.allclose(sent_total + kept, input_total, rtol=1e-4, atol=1e-6)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns (``torch.equal`` on floats has -0 == 0 and NaN != NaN)."""
    return t.contiguous().view(torch.int32)


def _with_zeros() -> torch.Tensor:
    """A row of zeros, a row of zeros of both signs, and whole blocks of zeros (of 7); rows
    of 7 x 256 values, whole blocks of either size."""
    x = _sample(3, 1792, seed=5)
    x[0, 7:21] = 0.0
    x[1] = 0.0
    x[2] = 0.0
    x[2, ::2] = -0.0
    return x


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 257), (4, 1000), (2, 1792), "zeros"])
@pytest.mark.parametrize("block", [256, 7])
def test_encode_gives_back_the_decoded_payload_bit_for_bit(
    name: str, shape: tuple[int, int] | str, block: int
) -> None:
    """``encode(x, dequantized=d)`` puts into ``d`` what ``decode`` of its payload returns, bit
    for bit, without unpacking it, and writes the payload of a plain ``encode``: the
    error-feedback residual ``x - d`` is the decode-based one. Tensors smaller than a block,
    uneven last blocks, whole blocks only, rows and blocks of zeros (either sign)."""
    x = _with_zeros() if isinstance(shape, str) else _sample(*shape, seed=sum(shape))
    numel = x.shape[1]
    codec = Codec(name, block_size=block, topk_density=0.1)
    payload = codec.encode(x)
    decoded = codec.decode(payload, numel)
    dequantized = torch.full_like(x, float("nan"))
    out = torch.full_like(payload, 0xAB)
    assert codec.encode(x, out=out, dequantized=dequantized) is out
    assert torch.equal(out, payload)
    assert torch.equal(_bits(dequantized), _bits(decoded))
    assert torch.equal(_bits(x - dequantized), _bits(x - decoded))
    # the residual on its own (topk: without the dense decoded values), and beside them
    residual = torch.full_like(x, float("nan"))
    assert codec.encode(x, out=out, residual=residual) is out
    assert torch.equal(out, payload)
    assert torch.equal(_bits(residual), _bits(x - decoded))
    residual.fill_(float("nan"))
    dequantized.fill_(float("nan"))
    codec.encode(x, out=out, dequantized=dequantized, residual=residual)
    assert torch.equal(_bits(residual), _bits(x - decoded))
    assert torch.equal(_bits(dequantized), _bits(decoded))
    # topk: in place (x becomes the residual), with a scratch buffer to spare; others refuse it
    in_place, scratch = x.clone(), torch.full_like(x, float("nan"))
    if name != "topk":
        with pytest.raises(ValueError, match="residual may be x itself with topk"):
            codec.encode(in_place, out=out, residual=in_place)
        return
    assert codec.encode(in_place, out=out, residual=in_place, scratch=scratch) is out
    assert torch.equal(out, payload)
    assert torch.equal(_bits(in_place), _bits(x - decoded))
    in_place = x.clone()  # no scratch given: one of its own
    codec.encode(in_place, out=out, residual=in_place)
    assert torch.equal(out, payload) and torch.equal(_bits(in_place), _bits(x - decoded))


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 257), (2, 1792), "zeros"])
@pytest.mark.parametrize("block", [256, 7])
def test_decoding_into_a_sum_adds_the_decoded_values(
    name: str, shape: tuple[int, int] | str, block: int
) -> None:
    """``decode(p, add=True)`` adds what ``decode(p)`` returns; a sparse payload (``topk``)
    touches only the values it carries, so a ``-0.0`` it does not carry stays ``-0.0``."""
    x = _with_zeros() if isinstance(shape, str) else _sample(*shape, seed=sum(shape))
    numel = x.shape[1]
    codec = Codec(name, block_size=block, topk_density=0.1)
    payload = codec.encode(x)
    decoded = codec.decode(payload, numel)
    base = _sample(*x.shape, seed=99)
    base[:, ::3] = -0.0
    total = base.clone()
    assert codec.decode(payload, numel, out=total, add=True) is total
    expected = base + decoded
    if codec.sparse:  # where nothing was sent, the sum is base itself, signed zeros and all
        ones = payload.clone()  # the values (bf16, first in the layout) all 1.0: where sent
        values = 2 * topk_per_chunk(block, 0.1) * -(-numel // block)
        ones[:, :values] = torch.ones(values // 2, dtype=torch.bfloat16).view(torch.uint8)
        carried = codec.decode(ones, numel) != 0
        expected = torch.where(carried, expected, base)
    assert torch.equal(_bits(total), _bits(expected))
    with pytest.raises(ValueError, match="out must be"):
        codec.decode(payload, numel, add=True)


@pytest.mark.parametrize("name", PAYLOADS)
def test_out_buffers_hold_what_new_tensors_would(name: str) -> None:
    """A payload written into a caller's buffer, aligned or not (a slice from an odd byte), is
    the same bytes; decoding it (unaligned too) into a caller's buffer, the same values."""
    codec = Codec(name, block_size=16, topk_density=0.1)
    x = _sample(3, 100, seed=7)
    payload = codec.encode(x)
    odd = torch.zeros(3, payload.shape[1] + 1, dtype=torch.uint8)[:, 1:]
    assert torch.equal(codec.encode(x, out=odd), payload)
    decoded = torch.full_like(x, float("nan"))
    assert codec.decode(odd, 100, out=decoded) is decoded
    assert torch.equal(_bits(decoded), _bits(codec.decode(payload, 100)))
    with pytest.raises(ValueError, match="out must be"):
        codec.encode(x, out=payload[:, 1:])
    with pytest.raises(ValueError, match="dequantized must be"):
        codec.encode(x, dequantized=x[:, 1:])


@pytest.fixture(params=["kernel", "torch"])
def selection(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Top-k's CPU selection by ``_topk_cpu.c`` or by torch operations."""
    if request.param == "torch":
        monkeypatch.setenv("RANGERDL_CPU_KERNEL", "0")
    elif _topk_kernel() is None:
        pytest.skip("no C compiler")
    return str(request.param)


@pytest.mark.parametrize(
    ("n", "k"),
    [(256, 8), (64, 2), (100, 3), (257, 8), (12, 12), (7, 1), (33, 5), (1000, 16), (256, 16),
     (256, 17)],
)  # fmt: skip
def test_topk_selection_takes_the_k_largest_with_ties_nan_and_zeros(
    n: int, k: int, selection: str
) -> None:
    """The positions top-k keeps hold the ``k`` largest magnitudes of each chunk, as
    ``torch.topk`` finds them, with ties (small integers), NaN (above inf) and zeros, by the C
    kernel and by torch operations alike."""
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(40, n, generator=gen)
    x[10:20] = torch.randint(-3, 4, (10, n), generator=gen).float()
    x[20:30, ::3] = float("nan")
    x[20:30, 1::5] = float("-inf")
    x[30:] = 0.0
    x[30:, ::2] = -0.0
    magnitude = x.abs().view(torch.int32)  # the bits order as the magnitudes do
    positions = _largest(magnitude, k)
    assert positions.shape == (40, k)
    assert all(len(set(row.tolist())) == k for row in positions)
    taken = magnitude.gather(1, positions).sort(dim=1, descending=True).values
    assert torch.equal(taken, magnitude.topk(k, dim=1).values)


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize("numel", [1, 3, 255, 256, 257, 4097])
@pytest.mark.parametrize("block", [1, 5, 256])
def test_encoded_size_is_the_cost_model(name: str, numel: int, block: int) -> None:
    codec = Codec(name, block_size=block, topk_density=0.03)
    payload = codec.encode(torch.randn(2, numel))
    assert payload.dtype == torch.uint8
    assert payload.shape == (2, payload_bytes(name, numel, block, 0.03))


def test_payload_bytes_by_hand() -> None:
    # 1000 values, blocks of 256 (4 blocks): int4 = 500 value bytes + 4 scales x 4 bytes
    assert payload_bytes("int4", 1000, 256) == 516
    assert payload_bytes("int2", 1000, 256) == 250 + 16
    assert payload_bytes("int8", 1000, 256) == 1000 + 16
    assert payload_bytes("bf16", 1000) == 2000 and payload_bytes("none", 1000) == 4000
    # topk at 3%: ceil(7.68) = 8 per chunk of 256, 32 kept: bf16 values + 8-bit positions
    assert topk_per_chunk(256, 0.03) == 8 and index_bits(256) == 8 and index_bits(257) == 9
    assert payload_bytes("topk", 1000, 256, 0.03) == 32 * 2 + 32
    # a sync over 3 ranks: chunks of ceil(1000 / 3) = 334, all-to-all + all-gather 2 (W-1) P
    assert compressed_sync_bytes("int4", 1000, 3) == 2 * 2 * (167 + 8)
    assert compressed_sync_bytes("int4", 1000, 3, mode="all_gather") == 2 * 3 * (167 + 8)
    assert compressed_sync_bytes("int4", 1000, 1) == 0
    link = Link(8e6, latency_s=0.0, efficiency=1.0)  # 1 MB/s
    assert compressed_sync_time("int4", 1000, 3, link) == pytest.approx(700e-6)
    # at 2 ranks one all-gather of the same bytes: one latency, not two
    slow = Link(8e6, latency_s=0.01, efficiency=1.0)
    bytes_2 = compressed_sync_bytes("int4", 1000, 2)  # chunks of 500: 250 B + 2 scales
    assert bytes_2 == 2 * (250 + 2 * 4)
    assert compressed_sync_time("int4", 1000, 2, slow) == pytest.approx(0.01 + bytes_2 / 1e6)


def test_options_name_impossible_combinations() -> None:
    with pytest.raises(ValueError, match="shard_slow and compression = 'int4'"):
        SyncOptions(shard_slow=True, compression="int4").validate()
    with pytest.raises(ValueError, match="shard_slow and comm_dtype = 'bf16'"):
        SyncOptions(shard_slow=True, comm_dtype="bf16").validate()
    with pytest.raises(ValueError, match="comm_dtype = 'bf16' and compression = 'int8'"):
        SyncOptions(comm_dtype="bf16", compression="int8").validate()
    with pytest.raises(ValueError, match="compression must be one of"):
        SyncOptions(compression="fp8").validate()
    for bad in (0, -1, 2**21, 1.5, True):
        with pytest.raises(ValueError, match="block_size"):
            SyncOptions(block_size=bad).validate()  # type: ignore[arg-type]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="topk_density"):
            SyncOptions(topk_density=bad).validate()
    SyncOptions(overlap=True, compression="topk").validate()  # the overlapped exchange


def test_comm_dtype_bf16_is_an_alias_without_error_feedback() -> None:
    alias = SyncOptions(comm_dtype="bf16").resolved(k=6, alpha=0.5)
    assert (alias.compression, alias.comm_dtype, alias.error_feedback) == ("bf16", "bf16", False)
    named = SyncOptions(compression="bf16").resolved(k=6, alpha=0.5)
    assert (named.compression, named.comm_dtype, named.error_feedback) == ("bf16", "bf16", True)
    assert SyncOptions(compression="int2").resolved(k=6, alpha=0.5).comm_dtype == "fp32"


def test_config_keys(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "c.toml"
    path.write_text(
        '[distributed]\ncompression = "topk"\nblock_size = 128\ntopk_density = 0.02\n'
        "error_feedback = false\n"
    )
    d = load_config(path).distributed
    assert (d.compression, d.block_size, d.topk_density, d.error_feedback) == (
        "topk",
        128,
        0.02,
        False,
    )
    with pytest.raises(ValueError, match=r"\[distributed\] compression must be one of"):
        load_config(path, ["--distributed.compression=int3"])
    with pytest.raises(ValueError, match=r"\[distributed\] shard_slow and compression"):
        load_config(path, ["--distributed.shard_slow=true"])


def test_plan_rows_count_each_payloads_bytes() -> None:
    from rangerdl.workflow.plan import Payload, StepTimes, local_row, make_plan

    times, link, n = StepTimes.from_total(0.05), Link(100e6), 1_000_000
    fp32 = local_row(times, n, 2, link, 800, k=8)
    int4 = local_row(times, n, 2, link, 800, k=8, payload=Payload("int4"))
    # 100 syncs; chunks of 500,000 values: 250,000 value bytes + 1954 scales x 4, sent twice
    assert int4.bytes_per_rank == 100 * 2 * (250_000 + 4 * 1954)
    assert int4.label == "distributed Ranger k=8, int4"
    assert fp32.bytes_per_rank / int4.bytes_per_rank == pytest.approx(32 / 4.125, rel=1e-3)
    assert local_row(times, n, 2, link, 800, k=8, comm_dtype="bf16").compression == "bf16"
    plan = make_plan(numel=n, times=times, world_size=2, link=link, steps=800, ks=(8,))
    labels = {r["label"] for r in plan.to_dict()["rows"]}
    assert {f"distributed Ranger k=8, {c}" for c in ("int8", "int4", "int2", "topk")} <= labels
    assert set(plan.smallest_k) >= {"int8", "int4", "int2", "topk"}


def test_topk_kernel_selection_does_not_depend_on_threads() -> None:
    if _topk_kernel() is None:
        pytest.skip("no C compiler")
    keys = torch.randn(4000, 256, generator=torch.Generator().manual_seed(3)).abs()
    keys[::7] = 0.0  # rows of ties: the quickselect
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _largest(keys.view(torch.int32), 8)
        torch.set_num_threads(2)
        two = _largest(keys.view(torch.int32), 8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
