"""Ranger as a torch.optim citizen: groups, closures, state_dict, schedulers, AMP, dtypes, errors."""

from __future__ import annotations

import io

import pytest
import torch
from optim_problems import loss_fn, make_params, torch_radam_lookahead, trajectory

from rangerdl import Ranger
from rangerdl.optim import rectification


def run_steps(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range
) -> list[float]:
    losses = []
    for t in steps:
        opt.zero_grad()
        loss = loss_fn(params, t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_defaults_are_the_original_rangers() -> None:
    opt = Ranger(make_params())
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.95, 0.999) and group["eps"] == 1e-5
    assert group["weight_decay"] == 0 and group["k"] == 6 and group["alpha"] == 0.5
    assert group["threshold"] == 5 and group["use_gc"] is True and group["gc_conv_only"] is False


def test_first_rectified_step_is_six() -> None:
    for beta2 in (0.9, 0.99, 0.999, 0.9999):
        assert next(t for t in range(1, 10) if rectification(t, beta2, 5.0) is not None) == 6


def test_param_groups_equal_separate_optimizers() -> None:
    settings = [
        {"lr": 1e-2, "betas": (0.9, 0.99), "k": 4, "alpha": 0.8},
        {"lr": 3e-3, "betas": (0.95, 0.999), "k": 6, "alpha": 0.5},
    ]
    params = make_params(conv=True)
    together = Ranger(
        [{"params": [params[0], params[2]], **settings[0]}, {"params": [params[1]], **settings[1]}]
    )
    run_steps(together, params, range(30))

    alone = make_params(conv=True)
    opts = [Ranger([alone[0], alone[2]], **settings[0]), Ranger([alone[1]], **settings[1])]  # type: ignore[arg-type]
    for t in range(30):
        for o in opts:
            o.zero_grad()
        loss_fn(alone, t).backward()
        for o in opts:
            o.step()
    for a, b in zip(params, alone, strict=True):
        assert torch.equal(a, b)


def test_add_param_group_mid_run_starts_fresh_state() -> None:
    params = make_params()
    opt = Ranger([params[0]], lr=1e-2)
    run_steps(opt, params, range(5))
    opt.add_param_group({"params": [params[1]], "lr": 5e-3, "k": 3})
    assert opt.param_groups[1]["k"] == 3 and opt.param_groups[1]["alpha"] == 0.5
    run_steps(opt, params, range(5, 20))
    assert opt.state[params[0]]["step"].item() == 20
    assert opt.state[params[1]]["step"].item() == 15

    ref = make_params()
    a, b = Ranger([ref[0]], lr=1e-2), None
    for t in range(20):
        if t == 5:
            b = Ranger([ref[1]], lr=5e-3, k=3)
        a.zero_grad()
        if b is not None:
            b.zero_grad()
        loss_fn(ref, t).backward()
        a.step()
        if b is not None:
            b.step()
    for x, y in zip(params, ref, strict=True):
        assert torch.equal(x, y)


def test_step_runs_closure_with_grad_enabled_and_returns_its_loss() -> None:
    params = make_params()
    opt = Ranger(params)
    seen = {}

    def closure() -> torch.Tensor:
        seen["grad_enabled"] = torch.is_grad_enabled()
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen["grad_enabled"] is True
    assert isinstance(loss, torch.Tensor) and loss.item() == pytest.approx(
        loss_fn(make_params()).item()
    )
    assert opt.step() is None


def test_params_without_grad_are_skipped_and_keep_their_own_clock() -> None:
    params = make_params()
    frozen_before = params[1].detach().clone()
    opt = Ranger(params, lr=1e-2, k=3)
    for t in range(4):  # params[1] gets no gradient for 4 steps
        opt.zero_grad()
        loss_fn([params[0], params[1].detach()], t).backward()
        opt.step()
    assert params[1].grad is None
    assert torch.equal(params[1], frozen_before) and params[1] not in opt.state
    run_steps(opt, params, range(4, 7))  # params[1]'s own steps 1-3; params[0]'s steps 5-7
    state0, state1 = opt.state[params[0]], opt.state[params[1]]
    assert (state0["step"].item(), state1["step"].item()) == (7, 3)
    # params[1] just synced after its own step 3; params[0] last synced after its step 6.
    assert torch.equal(params[1], state1["slow_buffer"])
    assert not torch.equal(params[1], frozen_before)
    assert not torch.equal(params[0], state0["slow_buffer"])


@pytest.mark.parametrize("cut", [8, 12])
@pytest.mark.parametrize("use_gc", [False, True])
def test_state_dict_round_trip_continues_bitwise(cut: int, use_gc: bool) -> None:
    straight = make_params(conv=True)
    opt = Ranger(straight, lr=1e-2, weight_decay=0.1, use_gc=use_gc)
    run_steps(opt, straight, range(30))

    first = make_params(conv=True)
    opt1 = Ranger(first, lr=1e-2, weight_decay=0.1, use_gc=use_gc)
    run_steps(opt1, first, range(cut))
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in first], "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in saved["model"]]
    opt2 = Ranger(resumed, lr=0.5, use_gc=use_gc)  # hyperparameters come from the state dict
    opt2.load_state_dict(saved["optim"])
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.1
    run_steps(opt2, resumed, range(cut, 30))
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)
    state = opt2.state[resumed[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "slow_buffer"}


def test_group_hyperparameters_are_saved() -> None:
    opt = Ranger(make_params(), k=4, alpha=0.3, threshold=6.0, use_gc=False)
    group = opt.state_dict()["param_groups"][0]
    assert (group["k"], group["alpha"], group["threshold"], group["use_gc"]) == (4, 0.3, 6.0, False)


def _scheduled_run(opt, stepper, make_sched, steps: int = 30):  # type: ignore[no-untyped-def]
    """Run ``steps`` steps of ``stepper`` with ``make_sched(opt)`` stepped after each one."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sched = make_sched(opt)
    lrs, rows = [], []
    for t in range(steps):
        stepper.zero_grad()
        loss_fn(params, t).backward()
        stepper.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        rows.append(torch.cat([p.detach().flatten() for p in params]).clone())
    return torch.stack(rows), lrs


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=30),
    ],
    ids=["LambdaLR", "CosineAnnealingLR", "OneCycleLR"],
)
def test_schedulers_drive_it_like_torch_radam(make_sched) -> None:  # type: ignore[no-untyped-def]
    ours_opt = Ranger(make_params(), lr=1e-2, use_gc=False)
    ours, our_lrs = _scheduled_run(ours_opt, ours_opt, make_sched)
    # Reference: the scheduler drives torch RAdam (OneCycleLR also cycles its beta1) inside the
    # hand-written Lookahead.
    ref_lookahead = torch_radam_lookahead(lr=1e-2)(make_params())
    ref, ref_lrs = _scheduled_run(ref_lookahead.inner, ref_lookahead, make_sched)  # type: ignore[attr-defined]
    assert our_lrs == ref_lrs and len(set(our_lrs)) > 5
    assert (ours - ref).abs().max() <= 5e-7


def test_grad_scaler_skipped_steps_advance_nothing() -> None:
    params = make_params()
    opt = Ranger(params, lr=1e-2, k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(3):
        opt.zero_grad()
        scaler.scale(loss_fn(params, t)).backward()
        scaler.step(opt)
        scaler.update()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    weights = [p.detach().clone() for p in params]
    opt.zero_grad()
    scaler.scale(loss_fn(params, 3)).backward()
    params[0].grad[0, 0] = float("inf")  # type: ignore[index]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, before[k]), k
    for p, w in zip(params, weights, strict=True):
        assert torch.equal(p, w)
    assert opt.state[params[0]]["step"].item() == 3


@pytest.mark.parametrize("fused", [False, True])
def test_maximize_equals_minimizing_the_negated_loss(fused: bool) -> None:
    def negated(params: list[torch.Tensor], t: int) -> torch.Tensor:
        return -loss_fn(params, t)

    up = make_params(conv=True)
    opt_up = Ranger(up, lr=1e-2, weight_decay=0.1, maximize=True, fused=fused)
    down = make_params(conv=True)
    opt_down = Ranger(down, lr=1e-2, weight_decay=0.1, fused=fused)
    for t in range(20):
        for opt, params, f in ((opt_up, up, negated), (opt_down, down, loss_fn)):
            opt.zero_grad()
            f(params, t).backward()
            opt.step()
    for a, b in zip(up, down, strict=True):
        assert torch.allclose(a, b, atol=5e-7, rtol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_bfloat16_keeps_bfloat16_state_and_tracks_fp32(fused: bool) -> None:
    bf = trajectory(lambda p: Ranger(p, lr=1e-2, fused=fused), dtype=torch.bfloat16, steps=20)
    fp = trajectory(lambda p: Ranger(p, lr=1e-2, fused=fused), steps=20)
    assert bf.dtype == torch.bfloat16
    assert (bf.float() - fp).abs().max() < 0.05
    params = make_params(dtype=torch.bfloat16)
    opt = Ranger(params, fused=fused)
    run_steps(opt, params, range(7))
    for key in ("exp_avg", "exp_avg_sq", "slow_buffer"):
        assert opt.state[params[0]][key].dtype == torch.bfloat16
    assert opt.state[params[0]]["step"].dtype == torch.float32


def test_sparse_gradients_raise() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = Ranger(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_parameters_raise() -> None:
    with pytest.raises(ValueError, match="complex"):
        Ranger([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"betas": (1.0, 0.999)},
        {"betas": (0.9, -0.1)},
        {"eps": -1e-8},
        {"weight_decay": -0.1},
        {"k": 0},
        {"k": 2.5},
        {"alpha": 0.0},
        {"alpha": 1.5},
        {"threshold": 3.0},
        {"fused": True, "foreach": True},
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match="Ranger"):
        Ranger(make_params(), **kwargs)


@pytest.mark.parametrize("fused", [False, True])
def test_zero_grad_zero_lr_leaves_parameters_bitwise_unchanged(fused: bool) -> None:
    params = make_params(conv=True)
    before = [p.detach().clone() for p in params]
    opt = Ranger(params, lr=0.0, weight_decay=0.1, fused=fused)
    for _ in range(13):  # through two Lookahead syncs
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


def test_grad_is_not_modified_by_gradient_centralisation() -> None:
    for fused in (False, True):
        params = make_params(conv=True)
        opt = Ranger(params, fused=fused)
        loss_fn(params).backward()
        grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        for _ in range(7):  # through the fused (rectified) path too
            opt.step()
        for p, g in zip(params, grads, strict=True):
            assert torch.equal(p.grad, g)  # type: ignore[arg-type]


@pytest.mark.long
@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    def train(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = Ranger(model.parameters(), lr=1e-2)
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))

        def step() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(step) if compiled else step
        for _ in range(14):
            fn()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(True), train(False), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
