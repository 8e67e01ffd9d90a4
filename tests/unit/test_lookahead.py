"""Lookahead around any torch optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from optim_problems import ReferenceLookahead, loss_fn, make_params, trajectory

from rangerdl import Lookahead, Ranger

INNER = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "SGD": lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=5e-2),
}


@pytest.mark.parametrize("inner", INNER)
def test_matches_hand_written_lookahead(inner: str) -> None:
    ours = trajectory(lambda p: Lookahead(INNER[inner](p), k=5, alpha=0.6))
    ref = trajectory(lambda p: ReferenceLookahead(INNER[inner](p), k=5, alpha=0.6))  # type: ignore[arg-type,return-value]
    assert torch.equal(ours, ref) or (ours - ref).abs().max() <= 5e-7
    assert (ours - trajectory(INNER[inner])).abs().max() > 1e-3, "Lookahead had no effect"


def test_around_torch_radam_equals_ranger_without_gc() -> None:
    def wrapped(p: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        inner = torch.optim.RAdam(
            p, lr=1e-2, betas=(0.95, 0.999), eps=1e-5, decoupled_weight_decay=True
        )
        return Lookahead(inner, k=6, alpha=0.5)

    ours = trajectory(wrapped)
    ranger = trajectory(lambda p: Ranger(p, lr=1e-2, use_gc=False))
    assert (ours - ranger).abs().max() <= 5e-7


def test_param_groups_are_the_inner_optimizers() -> None:
    params = make_params()
    inner = torch.optim.AdamW(params, lr=1e-3)
    opt = Lookahead(inner, k=4, alpha=0.3)
    assert opt.param_groups is inner.param_groups
    assert inner.param_groups[0]["k"] == 4 and inner.param_groups[0]["alpha"] == 0.3
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.zero_grad()
    loss_fn(params).backward()
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == 5e-4


@pytest.mark.parametrize("cut", [5, 8])
def test_state_dict_round_trip_continues_bitwise(cut: int) -> None:
    def run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
        for t in steps:
            opt.zero_grad()
            loss_fn(params, t).backward()
            opt.step()

    straight = make_params()
    run(Lookahead(torch.optim.AdamW(straight, lr=1e-2), k=4), straight, range(20))

    first = make_params()
    opt1 = Lookahead(torch.optim.AdamW(first, lr=1e-2), k=4)
    run(opt1, first, range(cut))
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in first], "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert "slow_buffer" in saved["optim"]["state"][0] and "inner" in saved["optim"]

    resumed = [torch.nn.Parameter(t.clone()) for t in saved["model"]]
    opt2 = Lookahead(torch.optim.AdamW(resumed, lr=1.0), k=9, alpha=0.9)
    opt2.load_state_dict(saved["optim"])
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert opt2.param_groups[0]["k"] == 4 and opt2.param_groups[0]["lr"] == 1e-2
    run(opt2, resumed, range(cut, 20))
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_add_param_group_then_step() -> None:
    params = make_params()
    opt = Lookahead(torch.optim.SGD([params[0]], lr=0.1), k=2)
    opt.add_param_group({"params": [params[1]], "alpha": 0.9})
    assert len(opt.optimizer.param_groups) == 2 and opt.param_groups[1]["k"] == 2
    for t in range(4):
        opt.zero_grad()
        loss_fn(params, t).backward()
        opt.step()
    assert opt.state[params[1]]["step"].item() == 4
    assert torch.equal(params[1], opt.state[params[1]]["slow_buffer"])


def test_closure_is_passed_to_the_inner_optimizer() -> None:
    params = make_params()
    opt = Lookahead(torch.optim.LBFGS(params, lr=0.1, max_iter=3), k=2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss.detach()

    first = opt.step(closure)
    second = opt.step(closure)
    assert isinstance(first, torch.Tensor) and second.item() < first.item()  # type: ignore[union-attr]


def test_bad_arguments_raise() -> None:
    params = make_params()
    with pytest.raises(TypeError, match="Optimizer"):
        Lookahead(params, k=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        Lookahead(torch.optim.SGD(params, lr=0.1), k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(torch.optim.SGD(params, lr=0.1), alpha=0.0)
    with pytest.raises(ValueError, match="not a Lookahead state dict"):
        Lookahead(torch.optim.SGD(params, lr=0.1)).load_state_dict(
            torch.optim.SGD(params, lr=0.1).state_dict()
        )
