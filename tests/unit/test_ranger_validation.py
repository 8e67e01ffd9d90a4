"""Arguments Ranger refuses up front, and gradient centralisation on fan-in-1 weights."""

from __future__ import annotations

import math

import pytest
import torch

from rangerdl import Ranger


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "invalid eps"),
        ({"eps": math.inf}, "invalid eps"),
        ({"lr": math.inf}, "invalid lr"),
        ({"lr": math.nan}, "invalid lr"),
        ({"weight_decay": math.inf}, "invalid weight_decay"),
    ],
)
def test_non_finite_or_zero_hyperparameters_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Ranger([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_zero_gradients_stay_finite() -> None:
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = Ranger([w])
    for _ in range(8):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_parameters_are_refused_up_front(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=f"dtype {dtype}"):
        Ranger([torch.zeros(2, 3, dtype=dtype)])
    opt = Ranger([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match=f"dtype {dtype}"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=dtype)]})


@pytest.mark.parametrize("path", ["fused", "foreach", "single"])
@pytest.mark.parametrize(
    "module",
    [torch.nn.Linear(1, 8), torch.nn.Embedding(5, 1), torch.nn.Conv2d(1, 4, 1)],
    ids=["linear-1-in", "embedding-dim-1", "conv-1x1-one-channel"],
)
def test_gc_skips_weights_whose_fan_in_is_one(path: str, module: torch.nn.Module) -> None:
    """With GC the references centralise a (H, 1) gradient to zero: the weight never trains."""
    weight = module.weight
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}
    w0 = weight.detach().clone()
    opt = Ranger([weight], lr=0.01, **flags[path])
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        weight.grad = torch.randn(weight.shape, generator=gen)
        opt.step()
    assert not torch.equal(weight.detach(), w0)
    # ... and equals Ranger without GC on such a tensor
    other = torch.nn.Parameter(w0.clone())
    ref = Ranger([other], lr=0.01, use_gc=False, **flags[path])
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        other.grad = torch.randn(other.shape, generator=gen)
        ref.step()
    assert torch.equal(weight.detach(), other.detach())
