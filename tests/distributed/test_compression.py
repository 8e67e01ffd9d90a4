"""Compressed pseudo-gradients on real processes (torchrun, gloo), against references computed here.

One launch per world size (1 to 4) runs every scenario of ``compression_worker.py``: the exchange
of every payload and both modes, training under each payload (with error feedback, overlap, a
tensor smaller than a block), and a resume from a checkpoint. The references below re-implement
the sync with W replicas in one process, trusting only :class:`Codec` (tested on its own in
``tests/unit/test_compression.py``).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from compression_worker import exchange_input, make_model
from problem import batch, flat, loss

from rangerdl.distributed.compression import Codec
from rangerdl.distributed.cost import compressed_sync_bytes

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
PAYLOADS = ("bf16", "int8", "int4", "int2", "topk")
SIZES = (1, 5, 83, 203)  # smaller than a block of 4, than W blocks, uneven chunks
BLOCK, DENSITY, STEPS = 4, 0.3, 6


def _train_entries() -> list[dict[str, Any]]:
    entries = [
        {"name": p, "sync": {"compression": p, "block_size": BLOCK, "topk_density": DENSITY}}
        for p in PAYLOADS
    ]
    entries += [
        {"name": "int2-no-ef", "sync": {"compression": "int2", "error_feedback": False}},
        {"name": "int4-tiny", "model": "tiny", "sync": {"compression": "int4"}},  # block 256
        {"name": "topk-overlap", "sync": {"compression": "topk", "overlap": True}},
        {"name": "none", "sync": {}},
    ]
    return [{"steps": STEPS, **e} for e in entries]


SPEC = {
    "exchange": {"codecs": ["none", *PAYLOADS], "sizes": list(SIZES), "block_size": BLOCK},
    "train": _train_entries(),
    "resume": {"sync": {"compression": "int2", "overlap": True}, "steps": 9, "at": 5},
}


@functools.cache
def _launch(nproc: int, out: Path) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        str(TORCHRUN),
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(HERE / "compression_worker.py"),
        str(out),
        json.dumps(SPEC),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``launched(W)``: the per-rank records of one launch with W processes (made once)."""
    root = tmp_path_factory.mktemp("compression")
    return lambda nproc: _launch(nproc, root / f"w{nproc}")


WORLDS = [1, 2, 3, 4]


# ---------------------------------------------------------------------------------- references
def reference_exchange(
    codec: Codec, inputs: list[torch.Tensor], chunk: int, residuals: list[torch.Tensor], mode: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The mean every rank must hold, and each rank's mean residual afterwards."""
    world = len(inputs)
    payloads = [codec.encode(x.view(world, chunk)) for x in inputs]
    if mode == "all_gather":
        decoded = torch.stack([codec.decode(p, chunk).view(-1) for p in payloads])
        return decoded.sum(0).div_(world), residuals
    parts, kept = [], []
    for j in range(world):
        received = torch.stack([p[j] for p in payloads])
        mine = codec.decode(received, chunk).sum(0, keepdim=True).div_(world)
        mine.add_(residuals[j])
        encoded = codec.encode(mine)
        decoded = codec.decode(encoded, chunk)
        kept.append(mine.sub(decoded).view(-1))
        parts.append(decoded.view(-1))
    return torch.cat(parts), kept


def reference_training(entry: dict[str, Any], world: int) -> list[list[torch.Tensor]]:
    """W replicas of the worker's training (SGD inner, blocking syncs every 2 steps, outer lr
    0.5), the sync done by hand; each replica's weights after every step. At W = 2 the mean is
    all-gathered (never encoded again, so no mean residual), else all-to-all + all-gather."""
    sync = {"block_size": 256, "topk_density": 0.03, "error_feedback": True, **entry["sync"]}
    codec = Codec(sync["compression"], sync["block_size"], sync["topk_density"])
    models = [make_model(entry.get("model", "problem")) for _ in range(world)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    numel = flat(models[0]).numel()
    chunk = -(-numel // world)
    phi = flat(models[0])
    residual = [torch.zeros(world * chunk) for _ in range(world)]
    mean_residual = [torch.zeros(chunk) for _ in range(world)]
    feedback = sync["error_feedback"]
    traj: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for step in range(entry["steps"]):
        for r, (m, opt) in enumerate(zip(models, opts, strict=True)):
            x, y = batch(r, step)
            opt.zero_grad()
            loss(m, x, y).backward()
            opt.step()
        if (step + 1) % 2 == 0:
            deltas = []
            for r, m in enumerate(models):
                d = torch.zeros(world * chunk)
                d[:numel].copy_(flat(m)).sub_(phi)
                if feedback:
                    d.add_(residual[r])
                deltas.append(d)
                if feedback:
                    residual[r] = d - codec.decode(codec.encode(d.view(world, chunk)), chunk).view(
                        -1
                    )
            zero = [torch.zeros(chunk) for _ in range(world)]
            # OuterSync's exchange: one all-gather at 2 ranks (the same bytes), else all-to-all
            mode = "all_gather" if world == 2 else "all_to_all"
            mean, kept = reference_exchange(
                codec, deltas, chunk, mean_residual if feedback else zero, mode
            )
            if feedback:
                mean_residual = kept
            phi = phi.add(mean[:numel], alpha=0.5)
            for m in models:
                _set_flat(m, phi)
        for r, m in enumerate(models):
            traj[r].append(flat(m))
    return traj


def _set_flat(model: torch.nn.Module, values: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(values[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world", WORLDS)
def test_exchange_sums_decoded_payloads_in_fp32(launched: Any, world: int) -> None:
    """Every payload, both modes, uneven chunks and inputs smaller than a block: every rank holds
    the mean of the decoded payloads (the lossless ``none`` codec: the exact fp32 mean), and the
    all-to-all's owner of a chunk keeps what its second encoding lost; the same when the owner
    takes its chunk of the mean from its encoding instead of decoding it again."""
    recs = launched(world)
    for name in ("none", *PAYLOADS):
        codec = Codec(name, BLOCK, DENSITY)
        for numel in SIZES:
            chunk = -(-numel // world)
            inputs = []
            for r in range(world):
                x = torch.zeros(world * chunk)
                x[:numel] = exchange_input(r, numel)
                inputs.append(x)
            for mode in ("all_to_all", "all_gather"):
                residuals = [torch.full((chunk,), 0.01 * (r + 1)) for r in range(world)]
                mean, kept = reference_exchange(codec, inputs, chunk, residuals, mode)
                keys = [f"{name}-{numel}-{mode}"]
                keys += [f"{name}-{numel}-{mode}-own"]
                for r, key in itertools.product(range(world), keys):
                    got = recs[r]["exchange"][key]
                    assert torch.equal(got["mean"], mean), (key, r)
                    assert torch.equal(got["residual"], kept[r]), (key, r)
                if name == "none" and mode == "all_gather":  # lossless: the plain fp32 mean
                    exact = torch.stack(inputs).sum(0).div_(world)
                    assert torch.equal(mean, exact)


@pytest.mark.parametrize("world", WORLDS)
def test_compressed_training_matches_the_reference_sync(launched: Any, world: int) -> None:
    """Each payload with error feedback (and int2 without; a 1-value tensor with block 256)
    follows the hand-written sync bit for bit, and all ranks agree after every sync."""
    recs = launched(world)
    for entry in SPEC["train"]:
        name = entry["name"]
        if name in ("none", "topk-overlap"):
            continue
        ref = reference_training(entry, world)
        for r in range(world):
            rec = recs[r][name]
            assert all(rec["synced_equal"]), name
            for step, (a, b) in enumerate(zip(rec["traj"], ref[r], strict=True)):
                assert torch.equal(a, b), (name, r, step, (a - b).abs().max())


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_are_the_payloads_handed_to_the_collectives(launched: Any, world: int) -> None:
    """comm/bytes per rank = 3 syncs x 2 (W-1) x bytes of one encoded chunk, counted by hand for
    the 83-parameter model (chunk c = ceil(83 / W) values)."""
    recs = launched(world)
    c = -(-83 // world)
    blocks = -(-c // BLOCK)  # block_size 4
    kept = min(BLOCK, max(1, -(-3 * BLOCK // 10)))  # ceil(0.3 * 4) = 2 per chunk
    hand = {
        "bf16": 2 * c,
        "int8": c + 4 * blocks,
        "int4": -(-c // 2) + 4 * blocks,
        "int2": -(-c // 4) + 4 * blocks,
        "topk": 2 * blocks * kept + -(-blocks * kept * 2 // 8),  # positions: 2 bits each
    }
    for name, per_chunk in hand.items():
        expected = 3 * 2 * (world - 1) * per_chunk
        assert expected == 3 * compressed_sync_bytes(name, 83, world, BLOCK, DENSITY)
        for r in range(world):
            assert recs[r][name]["comm"]["comm/bytes"] == expected, (name, world)
            assert recs[r][name]["comm"]["comm/syncs"] == 3
    if world == 3:  # a literal hand count: c = 28, int4 = 14 value bytes + 7 scales x 4 = 42
        assert recs[0]["int4"]["comm"]["comm/bytes"] == 3 * 2 * 2 * 42


@pytest.mark.parametrize("world", [2, 4])
def test_overlap_with_topk_keeps_ranks_together(launched: Any, world: int) -> None:
    recs = launched(world)
    finals = [recs[r]["topk-overlap"]["final"] for r in range(world)]
    assert all(torch.equal(finals[0], f) for f in finals[1:])
    plain = recs[0]["none"]["final"]
    assert (finals[0] - plain).abs().max() < 0.2  # compressed, but the same training


@pytest.mark.parametrize("world", [2, 3])
def test_resume_with_error_feedback_is_bitwise_identical(launched: Any, world: int) -> None:
    recs = launched(world)
    for r in range(world):
        rec = recs[r]["resume"]
        at = SPEC["resume"]["at"]
        assert len(rec["resumed"]) == len(rec["through"]) - at
        for a, b in zip(rec["through"][at:], rec["resumed"], strict=True):
            assert torch.equal(a, b)
        outer = rec["saved_outer"]
        assert outer["compression"] == "int2"
        assert outer["error_feedback"].abs().sum() > 0  # the residual was saved, not zeros
        assert outer["error_feedback_mean"].shape == (-(-83 // world),)


@pytest.mark.parametrize("world", [2, 4])
def test_error_feedback_state_holds_what_the_payload_lost(launched: Any, world: int) -> None:
    """After training, the saved residual is what the last encoding lost: re-encoding (payload +
    residual) is not needed; the residual is non-zero under int2 and absent without feedback."""
    recs = launched(world)
    state = recs[0]["int2"]["state"]
    assert state["error_feedback"].shape == (world * -(-83 // world),)
    assert state["error_feedback"].abs().max() > 0
    assert "error_feedback" not in recs[0]["int2-no-ef"]["state"]
    stats = recs[0]["int2"]["comm"]
    assert stats["mem/outer_state_bytes"] == 4 * (83 + world * -(-83 // world) + -(-83 // world))
