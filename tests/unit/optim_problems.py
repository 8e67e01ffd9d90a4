"""A small problem whose gradients depend on the current weights, and a hand-written Lookahead.

Both are references for the optimizer tests: nothing here imports rangerdl.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def make_params(
    seed: int = 0, dtype: torch.dtype = torch.float32, conv: bool = False
) -> list[torch.nn.Parameter]:
    """A 2-D weight, a 1-D bias and (with ``conv``) a 4-D kernel."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (7,)] + ([(3, 2, 3, 3)] if conv else [])
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def loss_fn(params: list[torch.Tensor], step: int = 0) -> torch.Tensor:
    """A non-quadratic loss so that gradients depend on the weights in a non-trivial way."""
    gen = torch.Generator().manual_seed(1000 + step % 3)
    dtype = params[0].dtype
    x = torch.randn(16, 5, generator=gen).to(dtype)
    target = torch.randn(16, 7, generator=gen).to(dtype)
    w, b = params[0], params[1]
    loss = ((torch.tanh(x @ w + b) - target) ** 2).mean() + 0.05 * (w**4).mean()
    if len(params) > 2:
        loss = loss + (params[2].sin() * params[2]).sum() * 0.1
    return loss


def trajectory(
    make: MakeOptimizer,
    steps: int = 36,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    conv: bool = False,
) -> torch.Tensor:
    """Flattened parameters after every step, shape ``(steps, num_values)``."""
    params = make_params(seed, dtype, conv)
    opt = make(params)
    out = []
    for t in range(steps):
        opt.zero_grad()
        loss_fn(params, t).backward()
        opt.step()
        out.append(torch.cat([p.detach().flatten() for p in params]).clone())
    return torch.stack(out)


class ReferenceLookahead:
    """Lookahead written out by hand: phi starts at theta_0, syncs after steps k, 2k, ..."""

    def __init__(self, inner: torch.optim.Optimizer, k: int, alpha: float) -> None:
        self.inner, self.k, self.alpha, self.t = inner, k, alpha, 0
        self.param_groups = inner.param_groups
        self.slow = [p.detach().clone() for g in inner.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.t += 1
        if self.t % self.k == 0:
            params = [p for g in self.inner.param_groups for p in g["params"]]
            for p, s in zip(params, self.slow, strict=True):
                s.add_(p - s, alpha=self.alpha)
                p.copy_(s)


def torch_radam_lookahead(
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.95, 0.999),
    eps: float = 1e-5,
    weight_decay: float = 0.0,
    k: int = 6,
    alpha: float = 0.5,
) -> MakeOptimizer:
    """``torch.optim.RAdam(decoupled_weight_decay=True)`` inside the hand-written Lookahead."""

    def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        inner = torch.optim.RAdam(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=True,
        )
        return ReferenceLookahead(inner, k, alpha)  # type: ignore[return-value]

    return make
