"""The one-pass CPU kernel (fused path, float32): same result as the single-tensor reference step,
deterministic, chosen by default, and a clean fallback when it cannot run."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch
from optim_problems import trajectory

from rangerdl import Ranger, _native
from rangerdl.optim import _cpu_kernel

ATOL = 5e-7
REFERENCE: dict[str, Any] = {"foreach": False, "fused": False}

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls into the kernel (still running it)."""
    calls: list[int] = []
    real = _cpu_kernel.step

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(len(args[1]))
        real(*args, **kwargs)

    monkeypatch.setattr(_cpu_kernel, "step", counting)
    return calls


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    if a.numel() == 0:
        return
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol:.1g}"


@needs_cc
def test_default_on_cpu_float32_is_the_one_pass_kernel(kernel_calls: list[int]) -> None:
    trajectory(lambda p: Ranger(p, lr=1e-2), conv=True, steps=8)
    assert len(kernel_calls) == 8


@needs_cc
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weight_decay": 0.1},
        {"maximize": True, "weight_decay": 0.1},
        {"gc_conv_only": True},
        {"use_gc": False},
        {"k": 1, "alpha": 0.8},
        {"k": 4, "alpha": 1.0},
        {"lookahead": False},
        {"betas": (0.3, 0.99), "threshold": 6.0},
    ],
    ids=repr,
)
def test_kernel_matches_the_single_tensor_reference(
    kwargs: dict[str, Any], kernel_calls: list[int]
) -> None:
    ours = trajectory(lambda p: Ranger(p, lr=1e-2, **kwargs), conv=True)
    ref = trajectory(lambda p: Ranger(p, lr=1e-2, **kwargs, **REFERENCE), conv=True)
    assert kernel_calls, "the kernel did not run: vacuous test"
    assert_close(ours, ref)
    assert (ours[-1] - ours[0]).abs().max() > 1e-2


def _random_grad_run(
    shapes: list[tuple[int, ...]], steps: int = 14, **kwargs: Any
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = Ranger(params, lr=1e-2, weight_decay=0.1, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) + 0.5  # a row mean to remove
        opt.step()
    return [p.detach().clone() for p in params]


# Rows longer and shorter than a vector, more rows than threads, an uncentred tensor that is not
# a multiple of the kernel's chunk, a 4-D kernel, an empty tensor.
SHAPES = [(37, 300), (1000, 3), (10001,), (8, 3, 5, 5), (0, 4), (1, 17)]


@needs_cc
def test_kernel_matches_the_reference_on_awkward_shapes(kernel_calls: list[int]) -> None:
    ours = _random_grad_run(SHAPES)
    ref = _random_grad_run(SHAPES, **REFERENCE)
    assert kernel_calls
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, atol=2e-6)  # |p| ~ 1 here: a few float32 ulps


@needs_cc
def test_kernel_is_bitwise_deterministic_for_any_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _random_grad_run(SHAPES)
        torch.set_num_threads(2)
        two = _random_grad_run(SHAPES)
        again = _random_grad_run(SHAPES)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_kernel_turned_off_uses_torch_fused_adamw_and_agrees(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[int]
) -> None:
    monkeypatch.setenv("RANGERDL_CPU_KERNEL", "0")
    ours = trajectory(lambda p: Ranger(p, lr=1e-2, fused=True), conv=True)
    ref = trajectory(lambda p: Ranger(p, lr=1e-2, **REFERENCE), conv=True)
    assert not kernel_calls
    assert_close(ours, ref)


def test_missing_compiler_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, kernel_calls: list[int]
) -> None:
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setenv("CC", "no-such-compiler-rangerdl")
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        ours = trajectory(lambda p: Ranger(p, lr=1e-2), conv=True)
    ref = trajectory(lambda p: Ranger(p, lr=1e-2, **REFERENCE), conv=True)
    assert not kernel_calls
    assert_close(ours, ref)


def test_non_contiguous_gradients_take_the_torch_fused_path(kernel_calls: list[int]) -> None:
    def run(**kwargs: Any) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        opt = Ranger([w], lr=1e-2, **kwargs)
        for _ in range(8):
            w.grad = torch.randn(5, 6, generator=gen).t()  # transposed: not contiguous
            opt.step()
        return w.detach().clone()

    ours = run()
    assert not kernel_calls
    assert_close(ours, run(**REFERENCE))


def test_fused_true_on_an_unsupported_device_raises() -> None:
    with pytest.raises(ValueError, match=r"fused=True.*meta"):
        Ranger([torch.nn.Parameter(torch.empty(3, device="meta"))], fused=True)


def test_foreach_true_never_uses_the_kernel(kernel_calls: list[int]) -> None:
    trajectory(lambda p: Ranger(p, lr=1e-2, foreach=True), conv=True, steps=8)
    assert not kernel_calls
