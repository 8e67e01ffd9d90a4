"""Ranger against the reference implementations, step by step (fp32, CPU, 36 steps, atol 5e-7).

36 steps cover the unrectified SGD steps 1-5, the first rectified step 6, and Lookahead syncs at
6, 12, ..., 36. Every test runs all three implementations (single-tensor, foreach, fused).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from optim_problems import torch_radam_lookahead, trajectory

from rangerdl import Ranger

pytorch_ranger = pytest.importorskip("pytorch_ranger")
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

ATOL = 5e-7
PATHS = {
    "single": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings(
        "ignore", category=UserWarning
    )  # deprecated add_ overloads in references


def assert_same(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol:.1g}"
    assert (actual[-1] - actual[0]).abs().max() > 1e-2, "parameters did not move: vacuous test"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_gc_off_matches_torch_radam_with_lookahead(path: str, weight_decay: float) -> None:
    ours = trajectory(
        lambda p: Ranger(p, lr=1e-2, weight_decay=weight_decay, use_gc=False, **PATHS[path])
    )
    ref = trajectory(torch_radam_lookahead(lr=1e-2, weight_decay=weight_decay))
    assert_same(ours, ref)


@pytest.mark.parametrize("path", PATHS)
def test_gc_off_matches_pytorch_ranger(path: str) -> None:
    ours = trajectory(lambda p: Ranger(p, lr=1e-2, use_gc=False, **PATHS[path]))
    ref = trajectory(lambda p: pytorch_ranger.Ranger(p, lr=1e-2))
    assert_same(ours, ref)


@pytest.mark.parametrize("path", PATHS)
def test_gc_off_with_decay_matches_pytorch_ranger_to_rounding(path: str) -> None:
    # pytorch_ranger decays with p + (-lr wd) p, we (and torch) with p (1 - lr wd): the two round
    # differently by up to an ulp per step, which 36 steps accumulate to a few ulps.
    ours = trajectory(lambda p: Ranger(p, lr=1e-2, weight_decay=0.1, use_gc=False, **PATHS[path]))
    ref = trajectory(lambda p: pytorch_ranger.Ranger(p, lr=1e-2, weight_decay=0.1))
    assert_same(ours, ref, atol=1.5e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_gc_off_matches_pytorch_optimizer_ranger(path: str, weight_decay: float) -> None:
    ours = trajectory(
        lambda p: Ranger(p, lr=1e-2, weight_decay=weight_decay, use_gc=False, **PATHS[path])
    )
    ref = trajectory(
        lambda p: pytorch_optimizer.Ranger(
            p, lr=1e-2, weight_decay=weight_decay, use_gc=False, degenerated_to_sgd=True
        )
    )
    assert_same(ours, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_gc_on_matches_pytorch_optimizer_ranger(path: str, weight_decay: float) -> None:
    ours = trajectory(
        lambda p: Ranger(p, lr=1e-2, weight_decay=weight_decay, **PATHS[path]), conv=True
    )
    ref = trajectory(
        lambda p: pytorch_optimizer.Ranger(
            p, lr=1e-2, weight_decay=weight_decay, degenerated_to_sgd=True
        ),
        conv=True,
    )
    assert_same(ours, ref)


@pytest.mark.parametrize("path", PATHS)
def test_gc_conv_only_matches_pytorch_optimizer_ranger(path: str) -> None:
    ours = trajectory(lambda p: Ranger(p, lr=1e-2, gc_conv_only=True, **PATHS[path]), conv=True)
    ref = trajectory(
        lambda p: pytorch_optimizer.Ranger(p, lr=1e-2, gc_conv_only=True, degenerated_to_sgd=True),
        conv=True,
    )
    assert_same(ours, ref)


def test_reference_default_reverses_early_steps_and_we_do_not() -> None:
    # Negative control: pytorch_optimizer.Ranger's default (degenerated_to_sgd=False) moves steps 1-5
    # up the gradient. If this comparison ever passed, the tests above could not tell them apart.
    ours = trajectory(lambda p: Ranger(p, lr=1e-2), conv=True)
    ref = trajectory(lambda p: pytorch_optimizer.Ranger(p, lr=1e-2), conv=True)
    assert (ours - ref).abs().max() > 1e-3


def test_gc_changes_the_trajectory() -> None:
    # Negative control for GC: with a >= 2-D parameter it must matter.
    on = trajectory(lambda p: Ranger(p, lr=1e-2, use_gc=True))
    off = trajectory(lambda p: Ranger(p, lr=1e-2, use_gc=False))
    assert (on - off).abs().max() > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_alpha_one_matches_torch_radam(path: str) -> None:
    ours = trajectory(
        lambda p: Ranger(p, lr=1e-2, weight_decay=0.1, alpha=1.0, use_gc=False, **PATHS[path])
    )
    ref = trajectory(
        lambda p: torch.optim.RAdam(
            p, lr=1e-2, betas=(0.95, 0.999), eps=1e-5, weight_decay=0.1, decoupled_weight_decay=True
        )
    )
    assert_same(ours, ref)


@pytest.mark.parametrize("path", PATHS)
def test_k_beyond_the_run_matches_torch_radam(path: str) -> None:
    ours = trajectory(lambda p: Ranger(p, lr=1e-2, k=1000, use_gc=False, **PATHS[path]))
    ref = trajectory(
        lambda p: torch.optim.RAdam(
            p, lr=1e-2, betas=(0.95, 0.999), eps=1e-5, decoupled_weight_decay=True
        )
    )
    assert_same(ours, ref)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("use_gc", [False, True])
def test_all_implementations_agree(weight_decay: float, maximize: bool, use_gc: bool) -> None:
    runs = {
        name: trajectory(
            lambda p, kw=kw: Ranger(  # type: ignore[misc]
                p, lr=1e-2, weight_decay=weight_decay, maximize=maximize, use_gc=use_gc, **kw
            ),
            conv=True,
        )
        for name, kw in PATHS.items()
    }
    assert_same(runs["foreach"], runs["single"])
    assert_same(runs["fused"], runs["single"])


def test_float64_matches_torch_radam_with_lookahead() -> None:
    ours = trajectory(
        lambda p: Ranger(p, lr=1e-2, weight_decay=0.1, use_gc=False), dtype=torch.float64
    )
    ref = trajectory(torch_radam_lookahead(lr=1e-2, weight_decay=0.1), dtype=torch.float64)
    assert_same(ours, ref, atol=1e-12)
