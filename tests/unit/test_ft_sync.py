"""FaultTolerantSync against a stand-in torchft Manager: what a sync does when the all-reduce
completed, and when a group died inside it (torchft then reports should_commit() False and the
tensor holds partial sums)."""

from __future__ import annotations

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
