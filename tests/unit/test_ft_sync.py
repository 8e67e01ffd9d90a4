"""FaultTolerantSync against a stand-in torchft Manager: what a sync does when the all-reduce
completed, and when a group died inside it (torchft then reports should_commit() False and the
tensor holds partial sums)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from rangerdl import Ranger
from rangerdl.distributed import SyncOptions

pytest.importorskip("torchft")


class Done:
    def wait(self) -> None:
        return None


class FakeManager:
    """One group alone; ``garbage``: the all-reduce leaves noise (a peer died mid-way) and the
    sync is not committed, as torchft reports it."""

    def __init__(self, garbage: bool = False, commit: bool | None = None) -> None:
        self.garbage, self.commit = garbage, (not garbage) if commit is None else commit

    def register_state_dict_fn(self, *args: Any) -> None:
        pass

    def start_quorum(self) -> None:
        pass

    def num_participants(self) -> int:
        return 1

    def is_participating(self) -> bool:
        return True

    def allreduce(self, tensor: torch.Tensor) -> Done:
        if self.garbage:
            tensor.add_(torch.randn_like(tensor) * 1e3)
        return Done()

    def should_commit(self) -> bool:
        return self.commit

    def state_dict(self) -> dict[str, int]:
        return {"step": 0, "batches_committed": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loaded = state


def make(manager: FakeManager) -> tuple[nn.Module, Any]:
    from rangerdl.distributed.ft import FaultTolerantSync

    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    opt = Ranger(net.parameters(), lr=1e-2, lookahead=False)
    agreement = {"optim.lr": 0.01, "data.batch_size": 32}
    sync = FaultTolerantSync(opt, manager, SyncOptions(sync_every=2), agreement=agreement)
    return net, sync


def test_a_sync_a_group_died_in_is_discarded_not_taken_for_another_config() -> None:
    net, sync = make(FakeManager(garbage=True))
    before = [p.detach().clone() for p in net.parameters()]
    assert sync.sync() is False
    assert sync.stats["discarded"] == 1 and sync.stats["syncs"] == 0
    # nothing applied: the slow weights and the parameters are what they were
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert torch.equal(
        torch.cat([s.reshape(-1) for _, s in sync.slow_weights()]),
        torch.cat([b.reshape(-1) for b in before]),
    )


def test_a_committed_sync_whose_digests_differ_names_the_keys() -> None:
    _, sync = make(FakeManager(garbage=True, commit=True))
    with pytest.raises(ValueError, match=r"optim\.lr, data\.batch_size differ|data\.batch_size"):
        sync.sync()


def test_a_committed_sync_of_one_group_keeps_its_weights() -> None:
    net, sync = make(FakeManager())
    before = [p.detach().clone() for p in net.parameters()]
    assert sync.sync() is True and sync.stats["syncs"] == 1
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b)  # the mean of one group is itself; alpha 0.5 moves nothing


def test_a_checkpoint_round_trips_the_outer_state_and_one_without_it_is_refused() -> None:
    _, sync = make(FakeManager())
    opt = sync.optimizer
    saved = opt.state_dict()
    assert saved["outer"]["step"] == 0 and "slow_weights" in saved["outer"]
    with torch.no_grad():
        sync._slow.add_(1.0)  # a change the load must undo
    opt.load_state_dict(saved)
    assert torch.equal(sync._slow, saved["outer"]["slow_weights"])
    without = {k: v for k, v in saved.items() if k != "outer"}
    with pytest.raises(ValueError, match="not saved by an optimizer with a FaultTolerantSync"):
        opt.load_state_dict(without)


# ---------------------------------------------------------------- compressed payloads
class Future:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


class FakeGroup:
    """The manager's process group as seen by group ``rank`` of ``len(rows)``: its all-gather
    hands back the other groups' rows as given (``rows[rank]`` is replaced by this group's)."""

    def __init__(self, rows: list[torch.Tensor | None], rank: int, fail: bool = False) -> None:
        self.rows, self.rank, self.fail, self.sent = rows, rank, fail, []

    def size(self) -> int:
        return len(self.rows)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], _: Any):
        self.sent.append(inputs[0].clone())
        for i, out in enumerate(outputs[0]):
            row = inputs[0] if i == self.rank else self.rows[i]
            out.copy_(row if row is not None else torch.zeros_like(inputs[0]))
        error = RuntimeError("Connection closed by peer") if self.fail else None

        class Work:
            def get_future(self) -> Future:
                return Future(error)

        return Work()


class ManagerOfGroups(FakeManager):
    """torchft's Manager for a quorum of ``participants`` groups: errors reported by the sync
    make ``should_commit()`` False, as torchft's do."""

    def __init__(self, participants: int, participating: bool = True) -> None:
        super().__init__()
        self.participants, self.participating, self.error = participants, participating, None

    def num_participants(self) -> int:
        return self.participants

    def is_participating(self) -> bool:
        return self.participating

    def errored(self) -> Exception | None:
        return self.error

    def report_error(self, e: Exception) -> None:
        self.error = e

    def wrap_future(self, fut: Future, default: Any) -> Any:
        manager = self

        class Wrapped:
            def wait(self) -> Any:
                try:
                    return fut.wait()
                except Exception as e:
                    manager.report_error(e)
                    return default

        return Wrapped()

    def should_commit(self) -> bool:
        return self.error is None


def compressed(
    manager: ManagerOfGroups,
    group: FakeGroup,
    compression: str = "int4",
    seed: int = 0,
    lr: float = 1e-2,
    norm: bool = False,
) -> tuple[nn.Module, Any]:
    """A group's model after its local steps (``seed``), its sync not run yet. ``lr`` goes
    into the agreement (with ``norm``: a BatchNorm whose running mean the groups average)."""
    from rangerdl.distributed.ft import FaultTolerantSync

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 3))  # 1,323 values: blocks of 256
    if norm:
        net.append(nn.BatchNorm1d(3))
    opt = Ranger(net.parameters(), lr=lr, lookahead=False)
    options = SyncOptions(sync_every=2, compression=compression, block_size=256)
    sync = FaultTolerantSync(
        opt,
        manager,
        options,
        process_group=group,
        agreement={"optim.lr": lr} if norm else None,
        buffers=net.buffers(),
    )
    torch.manual_seed(seed)
    with torch.no_grad():  # this group's local steps
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for b in net.buffers():
            if b.is_floating_point():
                b.add_(torch.randn_like(b))
    sync.step = 2  # as after sync_every steps (step 0 would be a warm-up sync)
    return net, sync


def payload_row(compression: str, seed: int, participating: int = 1, **kw: Any) -> torch.Tensor:
    """The row another group (its own local steps, seed ``seed``) sends."""
    group = FakeGroup([None], 0)
    _, sync = compressed(ManagerOfGroups(1), group, compression, seed, **kw)
    sync.sync()
    row = group.sent[0].clone()
    row[0] = participating
    return row


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("compression", ["bf16", "int8", "int4", "int2", "topk"])
def test_the_compressed_mean_is_the_fp32_mean_of_the_groups_taking_part(compression: str) -> None:
    from rangerdl.distributed.compression import Codec
    from rangerdl.distributed.ft import HEADER

    others = [payload_row(compression, 1), payload_row(compression, 2, participating=0)]
    group = FakeGroup([None, others[0], others[1]], rank=0)
    manager = ManagerOfGroups(participants=2)
    net, sync = compressed(manager, group, compression, seed=0)
    slow = sync._slow.clone()
    delta = flat(net) - slow  # this group's pseudo-gradient (no residual yet)
    assert sync.sync() is True
    codec = Codec(compression, 256, sync.options.topk_density)
    mine = group.sent[0]
    assert mine[0] == 1  # taking part
    # the mean of the two rows marked as taking part, decoded and summed in fp32; the healing
    # group's row (0) is left out
    decoded = codec.decode(torch.stack([mine[HEADER:], others[0][HEADER:]]), sync.numel)
    mean = decoded.sum(dim=0) / 2
    expected = slow + sync.options.outer_lr * mean  # no outer momentum: the plain outer step
    assert sync._momentum is None
    assert torch.equal(sync._slow, expected)
    assert torch.equal(flat(net), expected)  # the parameters start from the slow weights
    # error feedback: what was sent plus what is kept is the pseudo-gradient, exactly
    sent = codec.decode(mine[HEADER:].view(1, -1), sync.numel).view(-1)
    assert torch.allclose(sent + sync._residual, delta, rtol=0, atol=1e-7)
    # bytes: one row to each of the 2 others (ring all-gather), header included
    assert sync.stats["bytes"] == 2 * mine.numel()


def test_a_compressed_sync_a_peer_died_in_changes_nothing_and_keeps_the_residual() -> None:
    group = FakeGroup([None, payload_row("int4", 1)], rank=0, fail=True)
    manager = ManagerOfGroups(participants=2)
    net, sync = compressed(manager, group)
    before, slow = flat(net).clone(), sync._slow.clone()
    assert sync.sync() is False
    assert sync.stats["discarded"] == 1 and sync.stats["bytes"] == 0
    assert torch.equal(flat(net), before) and torch.equal(sync._slow, slow)
    assert torch.equal(sync._residual, torch.zeros_like(sync._residual))


def test_a_quorum_that_does_not_match_the_marked_rows_is_discarded() -> None:
    # the quorum counts 3 groups, only 2 rows say they take part: the sync must not commit
    group = FakeGroup([None, payload_row("int8", 1), payload_row("int8", 2, 0)], rank=0)
    net, sync = compressed(ManagerOfGroups(participants=3), group, "int8")
    before = flat(net).clone()
    assert sync.sync() is False and torch.equal(flat(net), before)
    assert "marked their payload" in str(sync.manager.error)


def test_the_error_feedback_residual_round_trips_a_checkpoint() -> None:
    group = FakeGroup([None, payload_row("int2", 1)], rank=0)
    _, sync = compressed(ManagerOfGroups(participants=2), group, "int2")
    assert sync.sync() is True and sync._residual.abs().sum() > 0
    saved = sync.optimizer.state_dict()
    kept = saved["outer"]["error_feedback"].clone()
    sync._residual.zero_()
    sync.optimizer.load_state_dict(saved)
    assert torch.equal(sync._residual, kept)
    saved["outer"].pop("error_feedback")
    with pytest.raises(ValueError, match="no error-feedback residual"):
        sync.optimizer.load_state_dict(saved)


def test_buffers_are_averaged_and_configs_compared_in_the_same_all_gather() -> None:
    peer = payload_row("int8", 1, norm=True)
    group = FakeGroup([None, peer], rank=0)
    net, sync = compressed(ManagerOfGroups(participants=2), group, "int8", norm=True)
    mean_before = net[-1].running_mean.clone()
    _, other = compressed(ManagerOfGroups(1), FakeGroup([None], 0), "int8", seed=1, norm=True)
    assert sync.sync() is True
    assert torch.equal(net[-1].running_mean, (mean_before + other.buffers[0]) / 2)
    assert sync.stats["bytes"] == group.sent[0].numel()  # one row to the one peer

    odd = payload_row("int8", 1, norm=True, lr=0.5)  # a peer started with another lr
    _, sync = compressed(
        ManagerOfGroups(participants=2), FakeGroup([None, odd], 0), "int8", norm=True
    )
    with pytest.raises(ValueError, match=r"optim\.lr differ"):
        sync.sync()


# ---------------------------------------------------------------- overlapped syncs
GRAD = torch.linspace(-1, 1, 10)


def overlapped(manager: FakeManager, eager: bool) -> tuple[nn.Module, Any]:
    """A group alone whose syncs launch every 2 steps and merge a step later."""
    from rangerdl.distributed.ft import FaultTolerantSync

    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    opt = Ranger(net.parameters(), lr=1e-2, lookahead=False)
    options = SyncOptions(sync_every=2, outer_lr=0.7, overlap=True, eager=eager)
    return net, FaultTolerantSync(opt, manager, options)


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        offset = 0
        for p in net.parameters():
            g = GRAD[offset : offset + p.numel()].view_as(p) * (1 + step % 3)
            p.grad = g.clone()
            offset += p.numel()
        opt.step()


def reference(steps: int, set_at_2: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The same training without a sync: the flat weights after 2 and after ``steps`` steps
    (the weights set to ``set_at_2`` after step 2, as an eager launch sets them)."""
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    opt = Ranger(net.parameters(), lr=1e-2, lookahead=False)
    train(net, opt, 2)
    at_2 = flat(net).clone()
    if set_at_2 is not None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(set_at_2.clone(), net.parameters())
    for step in range(2, steps):
        offset = 0
        for p in net.parameters():
            p.grad = (GRAD[offset : offset + p.numel()].view_as(p) * (1 + step % 3)).clone()
            offset += p.numel()
        opt.step()
    return at_2, flat(net).clone()


@pytest.mark.parametrize("eager", [False, True])
def test_an_overlapped_sync_merges_a_step_late_keeping_the_step_trained_meanwhile(
    eager: bool,
) -> None:
    net, sync = overlapped(FakeManager(), eager)
    slow0 = sync._slow.clone()
    train(net, sync.optimizer, 2)  # launched at step 2: in flight
    assert sync._pending is not None and sync.stats["syncs"] == 0
    at_2, _ = reference(2)
    new_slow = slow0.lerp(at_2, 0.7)  # one group: the mean is its own weights
    if eager:  # the outer step with its own weights, applied at the launch
        assert torch.equal(flat(net), new_slow) and torch.equal(sync._slow, slow0)
    else:
        assert torch.equal(flat(net), at_2)
    # step 3 trains on, then the sync merges: the new slow weights plus the step's progress
    _, trained = reference(3, new_slow if eager else None)
    _step(net, sync.optimizer, 2)
    assert sync._pending is None and sync.stats["syncs"] == 1
    assert torch.equal(sync._slow, new_slow)
    base = new_slow if eager else at_2  # what the step trained from
    assert torch.equal(flat(net), trained.add(new_slow.sub(base)))


def test_a_discarded_overlapped_sync_takes_the_eager_step_back() -> None:
    net, sync = overlapped(FakeManager(garbage=True), eager=True)
    slow0 = sync._slow.clone()
    train(net, sync.optimizer, 2)
    at_2, _ = reference(2)
    estimate = slow0.lerp(at_2, 0.7)
    assert torch.equal(flat(net), estimate)
    _step(net, sync.optimizer, 2)  # trains from the estimate, then the merge discards
    assert sync.stats["discarded"] == 1 and sync.stats["syncs"] == 0
    assert torch.equal(sync._slow, slow0)  # never half-applied
    # the eager step taken back: the launch's weights plus the step's progress
    _, trained = reference(3, estimate)
    assert torch.equal(flat(net), trained.add(at_2.sub(estimate)))


@pytest.mark.parametrize("eager", [False, True])
def test_a_checkpoint_with_a_sync_in_flight_resumes_bit_for_bit(eager: bool) -> None:
    net, sync = overlapped(FakeManager(), eager)
    train(net, sync.optimizer, 2)  # in flight
    saved_model = {k: v.clone() for k, v in net.state_dict().items()}
    saved = copy.deepcopy(sync.optimizer.state_dict())
    assert saved["outer"]["pending"]["committed"] is True  # decided when saved
    for step in range(2, 7):  # steps 3-7: merges at 3, 5 and 7, launches at 4 and 6
        _step(net, sync.optimizer, step)
    resumed_net, resumed = overlapped(FakeManager(), eager)
    resumed_net.load_state_dict(saved_model)
    resumed.optimizer.load_state_dict(saved)
    assert resumed._pending is not None and resumed.step == 2
    for step in range(2, 7):
        _step(resumed_net, resumed.optimizer, step)
    assert torch.equal(flat(resumed_net), flat(net))
    assert torch.equal(resumed._slow, sync._slow)
    assert resumed.stats["syncs"] == sync.stats["syncs"] == 3
    # a saved sync in flight that is not this model's is refused, naming it, before anything
    # is loaded
    saved["outer"]["pending"]["snapshot"] = torch.zeros(3)
    saved["outer"]["slow_weights"] = saved["outer"]["slow_weights"] + 1
    slow = resumed._slow.clone()
    with pytest.raises(ValueError, match="overlapped sync's snapshot is not a tensor of shape"):
        resumed.optimizer.load_state_dict(saved)
    assert torch.equal(resumed._slow, slow) and resumed.step == 7
    saved["outer"]["pending"].pop("snapshot")
    with pytest.raises(ValueError, match="saved overlapped sync has keys"):
        resumed.optimizer.load_state_dict(saved)


def test_finish_merges_the_sync_in_flight_and_ends_on_the_slow_weights() -> None:
    net, sync = overlapped(FakeManager(), eager=False)
    train(net, sync.optimizer, 2)  # launched at the last step
    assert sync.finish() is True
    assert sync._pending is None and torch.equal(flat(net), sync._slow)


def _step(net: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """Training step ``step + 1`` (0-based ``step``), with :func:`train`'s gradient."""
    offset = 0
    for p in net.parameters():
        p.grad = (GRAD[offset : offset + p.numel()].view_as(p) * (1 + step % 3)).clone()
        offset += p.numel()
    opt.step()


def test_a_peer_with_another_config_or_another_group_size_is_refused_before_anything_loads() -> (
    None
):
    """A joining group compares the live peer's config values, and its number of processes,
    before it takes anything: a group of another size would exchange chunks of other sizes."""
    from rangerdl.distributed.ft import PROCESSES

    _, peer = make(FakeManager())
    net, joining = make(FakeManager())
    with torch.no_grad():
        for p in peer.params:
            p.add_(1.0)
    before = [p.detach().clone() for p in net.parameters()]
    for change, named in (
        ({PROCESSES: 2}, r"processes per replica group \(torchrun --nproc-per-node\) differ"),
        ({"optim.lr": 0.5}, r"optim\.lr differ"),
    ):
        state = peer._heal_state()
        state["agreement"] = {**state["agreement"], **change}
        with pytest.raises(ValueError, match=named):
            joining._load_heal_state(state)
        assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
        assert joining.stats["healed"] == 0
    joining._load_heal_state(peer._heal_state())  # the same config and size: taken
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), peer.params, strict=True))
