"""Lookahead around any torch optimizer; the Lookahead step itself; swapping slow weights in.

Distributed Lookahead (slow weights shared across workers) is ``rangerdl.distributed.OuterSync``,
which attaches to the inner optimizer instead of wrapping it; its module docstring says why the two
are kept apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

__all__ = ["Lookahead", "SlowWeightsHolder", "lookahead_", "use_slow_weights"]


def lookahead_(
    params: list[Tensor], slow: list[Tensor], alpha: float, *, foreach: bool = True
) -> None:
    """The Lookahead step, in place: ``slow += alpha * (param - slow); param = slow``.

    ``lerp`` makes ``alpha = 1`` copy the fast weights exactly. Zhang et al., "Lookahead
    Optimizer: k steps forward, 1 step back" (2019), Algorithm 1.
    """
    if not params:
        return
    if foreach and all(p.device.type in ("cpu", "cuda") for p in params):
        torch._foreach_lerp_(slow, params, alpha)
        torch._foreach_copy_(params, slow)
        return
    for p, s in zip(params, slow, strict=True):
        s.lerp_(p, alpha)
        p.copy_(s)


def slow_buffers(optimizer: Optimizer) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, state["slow_buffer"])`` for every parameter of ``optimizer`` that has one."""
    return [
        (p, optimizer.state[p]["slow_buffer"])
        for group in optimizer.param_groups
        for p in group["params"]
        if "slow_buffer" in optimizer.state.get(p, {})
    ]


class SlowWeightsHolder(Protocol):
    """Anything that keeps slow weights: ``Ranger``, ``Lookahead``, ``OuterSync``."""

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]: ...


@contextmanager
def use_slow_weights(holder: SlowWeightsHolder | Optimizer) -> Iterator[None]:
    """Copy the slow weights into the model's parameters for the ``with`` block (evaluate or save
    them), then put the fast weights back, so training continues undisturbed::

        with use_slow_weights(optimizer):   # Ranger, Lookahead, or a distributed OuterSync
            accuracy = evaluate(model)

    An optimizer without slow weights (plain AdamW) leaves the parameters as they are. Costs one
    copy of the parameters. With ``OuterSync(shard_slow=True)`` it is a collective.
    """
    method = getattr(holder, "slow_weights", None)
    slow = list(method()) if method is not None else []
    backup = [p.detach().clone() for p, _ in slow]
    with torch.no_grad():
        for p, s in slow:
            p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), b in zip(slow, backup, strict=True):
                p.copy_(b)


class Lookahead(Optimizer):
    r"""Lookahead (`Zhang et al., 2019 <https://arxiv.org/abs/1907.08610>`_) around any optimizer.

    .. math::
       \begin{aligned}
            &\phi \leftarrow \theta_0 \\
            &\textbf{for}\: t=1 \:\textbf{to}\: \ldots \:\textbf{do} \\
            &\hspace{5mm}\theta_t \leftarrow \text{inner\_step}(\theta_{t-1}) \\
            &\hspace{5mm}\textbf{if}\: t \bmod k = 0: \quad
                \phi \leftarrow \phi + \alpha(\theta_t - \phi);\quad \theta_t \leftarrow \phi
       \end{aligned}

    The inner optimizer's state (momenta) is kept across syncs. ``param_groups`` is the inner
    optimizer's list (the same objects), with ``k`` and ``alpha`` added to each group, so LR
    schedulers built on the wrapper drive the inner optimizer and ``k``/``alpha`` can differ per
    group. The slow weights live in this wrapper's ``state[p]["slow_buffer"]`` and are saved by
    ``state_dict()`` (keyed by parameter position, as torch does, never by ``id()``).

    Clock: each parameter counts the steps in which it had a gradient (``state[p]["step"]``) and
    syncs after its own steps ``k, 2k, ...``; torch optimizers skip parameters whose ``grad`` is
    ``None``, and so does the clock. ``phi`` starts at the parameter's value before its first step.

    Args:
        optimizer: the inner optimizer (AdamW, SGD, Adagrad, RAdam, ...).
        k: synchronisation period in steps.
        alpha: slow step size in (0, 1].

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: ``k`` not an int >= 1 or ``alpha`` outside (0, 1].
    """

    def __init__(
        self,
        optimizer: Optimizer,
        k: int = 6,
        alpha: float = 0.5,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self._wrapping = True
        super().__init__(optimizer.param_groups, {"k": k, "alpha": alpha})
        self._wrapping = False
        # Share the inner list itself: add_param_group and schedulers see one set of groups.
        self.param_groups = optimizer.param_groups
        self.defaults = {**optimizer.defaults, "k": k, "alpha": alpha}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._wrapping:
            super().add_param_group(param_group)
            group = param_group
        else:
            self.optimizer.add_param_group(param_group)
            group = self.param_groups[-1]
            group.setdefault("k", self.defaults["k"])
            group.setdefault("alpha", self.defaults["alpha"])
        _validate(group)

    def __repr__(self) -> str:
        return f"Lookahead({self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the inner optimizer, then the slow weights of parameters at a multiple of k."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:  # the slow weights start at theta_0, before the inner step
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["slow_buffer"] = p.detach().clone(memory_format=torch.preserve_format)
        with torch.enable_grad():
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        for group in self.param_groups:
            due: list[Tensor] = []
            slow: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                if int(state["step"].item()) % group["k"] == 0:
                    due.append(p)
                    slow.append(state["slow_buffer"])
            lookahead_(due, slow, group["alpha"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)`` for every parameter that has them (stepped at least
        once): the model worth evaluating and keeping. See :func:`use_slow_weights`."""
        return slow_buffers(self)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict under ``"inner"``, plus the slow weights."""
        own = super().state_dict()
        inner = self.optimizer.state_dict()
        return {"state": own["state"], "param_groups": own["param_groups"], "inner": inner}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "inner" not in state_dict:
            raise ValueError(
                "Lookahead.load_state_dict: no 'inner' entry; this is not a Lookahead state dict"
            )
        self.optimizer.load_state_dict(state_dict["inner"])
        super().load_state_dict(
            {"state": state_dict["state"], "param_groups": state_dict["param_groups"]}
        )
        # Optimizer.load_state_dict rebuilt our group dicts; point back at the inner ones.
        self.param_groups = self.optimizer.param_groups


def _validate(group: dict[str, Any]) -> None:
    k = group["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Lookahead: invalid k {k!r}; expected an int >= 1")
    if not 0.0 < group["alpha"] <= 1.0:
        raise ValueError(f"Lookahead: invalid alpha {group['alpha']}; expected in (0, 1]")
