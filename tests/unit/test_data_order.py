"""GlobalBatchSampler: order against numpy's permutation, exact-once per epoch, ranks, resume."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from itertools import chain

import numpy as np
import pytest

from rangerdl.data import GlobalBatchSampler, epoch_order


def take(sampler: GlobalBatchSampler, num: int, advance: bool = False) -> list[list[int | None]]:
    """The next ``num`` batches of a fresh iterator, advancing like a training loop if asked."""
    out = []
    for batch in itertools.islice(iter(sampler), num):
        out.append(batch)
        if advance:
            sampler.advance(1)
    return out


def global_batches(n: int, g: int, w: int, steps: int, **kw: object) -> list[list[int | None]]:
    """Per step, the concatenation of all ranks' batches (rank order)."""
    ranks = [
        take(GlobalBatchSampler(n, g, rank=r, world_size=w, **kw), steps)  # type: ignore[arg-type]
        for r in range(w)
    ]
    return [list(chain.from_iterable(ranks[r][s] for r in range(w))) for s in range(steps)]


def test_epoch_order_is_numpy_permutation_of_seed_and_epoch() -> None:
    for seed, epoch, n in [(0, 0, 10), (7, 3, 1000), (123, 0, 4097)]:
        expected = np.random.default_rng([seed, epoch]).permutation(n)
        np.testing.assert_array_equal(epoch_order(n, seed, epoch), expected)
    assert not np.array_equal(epoch_order(100, 0, 0), epoch_order(100, 0, 1))


@pytest.mark.parametrize("n", [10_001, 3])
def test_file_backed_order_equals_in_ram_order(n: int) -> None:
    order = epoch_order(n, 5, 2, max_ram_samples=2)
    assert isinstance(order, np.memmap) and order.dtype == np.int32
    np.testing.assert_array_equal(order, np.random.default_rng([5, 2]).permutation(n))


def test_batches_follow_the_epoch_order() -> None:
    n, g = 103, 10
    s = GlobalBatchSampler(n, g, seed=4)
    batches = take(s, 25)
    order0 = np.random.default_rng([4, 0]).permutation(n)
    order1 = np.random.default_rng([4, 1]).permutation(n)
    assert s.batches_per_epoch == 10 and s.num_dropped == 3
    for b in range(10):
        assert batches[b] == order0[b * g : (b + 1) * g].tolist()
    for b in range(10, 20):  # epoch 1 follows epoch 0; the last 3 of epoch 0 are dropped
        assert batches[b] == order1[(b - 10) * g : (b - 9) * g].tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 11, 97, 120, 121])
@pytest.mark.parametrize("drop_last", [True, False])
def test_each_sample_once_per_epoch_over_ranks(world_size: int, n: int, drop_last: bool) -> None:
    g = 12  # divisible by 1, 2, 3, 4
    if drop_last and n < g:
        with pytest.raises(ValueError, match="drop_last"):
            GlobalBatchSampler(n, g, world_size=world_size, drop_last=drop_last)
        return
    samplers = [
        GlobalBatchSampler(n, g, rank=r, world_size=world_size, seed=1, drop_last=drop_last)
        for r in range(world_size)
    ]
    per_epoch = samplers[0].batches_per_epoch
    for epoch in range(2):
        seen: Counter[int | None] = Counter()
        batches = [take(s, per_epoch * (epoch + 1))[-per_epoch:] for s in samplers]
        for rank_batches in batches:
            for batch in rank_batches:
                assert len(batch) == g // world_size  # every rank steps with a full batch
                seen.update(batch)
        pads = seen.pop(None, 0)
        assert all(count == 1 for count in seen.values()), "a sample was seen twice"
        if drop_last:
            assert len(seen) == n - n % g and pads == 0
            assert samplers[0].num_dropped == n % g
        else:
            assert set(seen) == set(range(n)) and pads == -n % g == samplers[0].num_padded


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_together_give_the_single_process_batches(world_size: int) -> None:
    n, g, steps = 250, 12, 45  # crosses two epoch ends
    single = global_batches(n, g, 1, steps, seed=3)
    assert global_batches(n, g, world_size, steps, seed=3) == single
    padded = global_batches(n, g, 1, steps, seed=3, drop_last=False)
    assert global_batches(n, g, world_size, steps, seed=3, drop_last=False) == padded


def test_unshuffled_order_is_dataset_order() -> None:
    s = GlobalBatchSampler(10, 4, shuffle=False, drop_last=False)
    assert take(s, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, None, None], [0, 1, 2, 3]]


def test_iteration_does_not_move_the_position_only_advance_does() -> None:
    s = GlobalBatchSampler(50, 10, seed=2)
    first = take(s, 7)
    assert (s.epoch, s.position) == (0, 0)
    assert take(s, 7) == first  # a new iterator starts where the loop is
    s.advance(4)
    assert (s.epoch, s.position, s.consumed) == (0, 4, 40)
    assert take(s, 3) == first[4:7]
    s.advance(1)  # the fifth batch ends epoch 0
    assert (s.epoch, s.position) == (1, 0)
    s.advance(12)
    assert (s.epoch, s.position) == (3, 2)
    with pytest.raises(ValueError, match="num_batches"):
        s.advance(-1)


def test_state_dict_holds_plain_types() -> None:
    s = GlobalBatchSampler(
        np.int64(1000), 64, seed=np.int64(9), world_size=2, manifest_checksum="abc"
    )  # numpy ints in, plain ints out
    s.advance(20)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert {k: state[k] for k in ("seed", "epoch", "consumed", "global_batch_size")} == {
        "seed": 9,
        "epoch": 1,
        "consumed": 320,
        "global_batch_size": 64,
    }
    assert state["manifest_checksum"] == "abc"
    assert all(type(v) in (int, bool, str) for v in state.values())


def run_with_cut(
    n: int, g: int, total: int, cut: int, world_size_after: int = 1, **kw: object
) -> list[list[int | None]]:
    """Train ``cut`` steps, save, then resume in fresh samplers for the remaining steps."""
    before = GlobalBatchSampler(n, g, **kw)  # type: ignore[arg-type]
    seen = take(before, cut, advance=True)
    state = json.loads(json.dumps(before.state_dict()))  # as a checkpoint would store it
    resumed = []
    for rank in range(world_size_after):
        s = GlobalBatchSampler(n, g, rank=rank, world_size=world_size_after, **kw)  # type: ignore[arg-type]
        s.load_state_dict(state)
        resumed.append(take(s, total - cut))
    after = [
        list(chain.from_iterable(resumed[r][i] for r in range(world_size_after)))
        for i in range(total - cut)
    ]
    return seen + after


@pytest.mark.parametrize("cut", [0, 3, 9, 10, 17, 40])  # start, mid, last, epoch end, later epochs
@pytest.mark.parametrize("world_size_after", [1, 2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_gives_the_uninterrupted_sequence(
    cut: int, world_size_after: int, drop_last: bool
) -> None:
    n, g, total = 105, 8, 50  # 13 (or 14 padded) batches per epoch
    reference = take(GlobalBatchSampler(n, g, seed=11, drop_last=drop_last), total)
    got = run_with_cut(n, g, total, cut, world_size_after, seed=11, drop_last=drop_last)
    assert got == reference


def test_resume_of_a_file_backed_order() -> None:
    reference = take(GlobalBatchSampler(1000, 16, seed=1), 100)
    assert run_with_cut(1000, 16, 100, 70, 2, seed=1, max_ram_samples=10) == reference


def test_resume_refuses_other_seed_data_or_order() -> None:
    s = GlobalBatchSampler(100, 10, seed=1, manifest_checksum="aaa")
    s.advance(3)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed 1, this sampler 2"):
        GlobalBatchSampler(100, 10, seed=2, manifest_checksum="aaa").load_state_dict(state)
    with pytest.raises(ValueError, match="data changed since the checkpoint"):
        GlobalBatchSampler(100, 10, seed=1, manifest_checksum="bbb").load_state_dict(state)
    with pytest.raises(ValueError, match="100 samples, this dataset has 101"):
        GlobalBatchSampler(101, 10, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        GlobalBatchSampler(100, 10, seed=1, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks keys"):
        GlobalBatchSampler(100, 10, seed=1).load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="'consumed' must be an int"):
        GlobalBatchSampler(100, 10, seed=1).load_state_dict({**state, "consumed": -5})


def test_resume_with_another_global_batch_warns_and_keeps_exact_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = 100
    s = GlobalBatchSampler(n, 10, seed=6)
    first = take(s, 3, advance=True)
    t = GlobalBatchSampler(n, 14, seed=6)
    with caplog.at_level(logging.WARNING):
        t.load_state_dict(s.state_dict())
    assert "global batch size changed" in caplog.text
    rest = take(t, 5)  # 70 remaining -> 5 batches of 14 in epoch 0
    seen = [i for b in first + rest for i in b]
    assert sorted(seen) == list(range(n))
    assert t.epoch == 0 and t.consumed == 30


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_samples": 0, "global_batch_size": 4}, "num_samples must be an int >= 1"),
        ({"num_samples": 10, "global_batch_size": 6, "world_size": 4}, "not a multiple"),
        ({"num_samples": 10, "global_batch_size": 4, "rank": 2, "world_size": 2}, "rank must be"),
        ({"num_samples": 10, "global_batch_size": 4, "seed": -1}, "seed must be"),
        ({"num_samples": 3, "global_batch_size": 4}, "no batch"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        GlobalBatchSampler(**kwargs)


def test_drop_last_says_how_many(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="rangerdl.data.order"):
        take(GlobalBatchSampler(103, 10), 1)
    assert "3 of 103 samples are skipped each epoch" in caplog.text


def test_replica_groups_that_die_and_heal_never_count_a_sample_twice_in_an_epoch() -> None:
    """The data rule of torchft replica groups (docs/distributed.md): group ``i`` of ``N``
    reads slice ``i`` of each global batch. Group 1 is killed at step 10 and restarted from
    nothing: it trains ``k`` steps of its own (re-reading its slices of steps 0..k-1), and at
    its first sync (step 16, the peers' sync) it heals: it takes a live peer's sampler state as
    the heal does (after that step), then reads its own slice from there. The reads that count
    (the survivors', and the healed group's before its kill and after its heal) hold no sample
    twice in the epoch; the dead group's slices of steps 10..16 are read by no one; its
    re-reads are work the heal discards."""
    n, groups, batch, k = 960, 3, 48, 4
    killed_at, healed_at = 10, 16
    make = lambda g: GlobalBatchSampler(n, batch, rank=g, world_size=groups, seed=3)  # noqa: E731
    samplers = [make(g) for g in range(groups)]
    iters = [iter(s) for s in samplers]
    counted: list[int] = []
    reread: list[int] = []

    def read(g: int) -> list[int]:
        out = next(iters[g])
        samplers[g].advance(1)
        return out

    for step in range(n // batch):  # one epoch
        for g in range(groups):
            if g != 1 or not killed_at <= step <= healed_at:
                counted += read(g)
                continue
            if step == healed_at - k + 1:  # restarted with no checkpoint: from the start
                samplers[1] = make(1)
                iters[1] = iter(samplers[1])
            if step > healed_at - k:
                reread += read(1)
            if step == healed_at:  # the heal: its peer's data position, after this step
                samplers[1].load_state_dict(samplers[0].state_dict())
                iters[1] = iter(samplers[1])
    assert len(counted) == len(set(counted))  # no sample counts twice
    order = epoch_order(n, seed=3, epoch=0)
    share = batch // groups
    missed = {
        int(i)
        for step in range(killed_at, healed_at + 1)
        for i in order[step * batch + share : step * batch + 2 * share]
    }
    assert set(range(n)) - set(counted) == missed
    first = {
        int(i) for step in range(k) for i in order[step * batch + share : step * batch + 2 * share]
    }
    assert set(reread) == first and first <= set(counted)
