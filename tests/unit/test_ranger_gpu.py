"""On CUDA: the fused kernel path (step tensors on the device) agrees with the CPU reference path."""

from __future__ import annotations

import pytest
import torch
from optim_problems import loss_fn, make_params

from rangerdl import Ranger

pytestmark = pytest.mark.gpu


def run(device: str, **kwargs: object) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(conv=True)]
    opt = Ranger(params, lr=1e-2, weight_decay=0.1, **kwargs)  # type: ignore[arg-type]
    for t in range(20):
        opt.zero_grad()
        loss_fn(params, t).backward()
        opt.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("kwargs", [{"fused": True}, {"foreach": True}], ids=["fused", "foreach"])
def test_cuda_paths_match_the_cpu_single_tensor_path(kwargs: dict[str, bool]) -> None:
    reference = run("cpu", foreach=False, fused=False)
    for a, b in zip(run("cuda", **kwargs), reference, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
