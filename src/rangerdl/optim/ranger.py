"""Ranger: RAdam + Lookahead + gradient centralisation, written the way ``torch/optim/radam.py`` is.

The class validates its arguments and keeps lazy per-parameter state; the functional :func:`ranger`
dispatches to one of three implementations that compute the same update:

* ``fused`` on contiguous float32 CPU tensors: rangerdl's one-pass kernel (``_ranger_cpu.c``, built
  once per machine by ``_cpu_kernel.py``): per row, the gradient's mean and then the whole update,
  Lookahead folded into the k-th step; 28 bytes per value like fused AdamW (+8/k on the k-th step).
* ``fused`` elsewhere (CUDA, other dtypes, no C compiler): once the variance is rectified
  (rho_t > threshold), the RAdam step is an AdamW step with ``lr' = lr * r_t``,
  ``eps' = eps / sqrt(1 - beta2^t)`` and ``weight_decay' = weight_decay / r_t``, so PyTorch's own
  fused AdamW kernel does it; gradient centralisation is a separate pass. The first few
  (unrectified) steps use the foreach path.
* ``foreach``: torch ``_foreach_*`` kernels over all tensors of a device/dtype/step bucket.
* single-tensor: a plain loop; the reference the others are tested against.

The class (with the algorithm in its docstring), the functional entry point and the three
implementations sit side by side, as in torch's radam.py, so that they stay identical.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT
from torch.utils._foreach_utils import (
    _get_foreach_kernels_supported_devices,
    _get_fused_kernels_supported_devices,
)

from rangerdl.optim import _cpu_kernel
from rangerdl.optim._radam_math import rectification
from rangerdl.optim.lookahead import lookahead_, slow_buffers

__all__ = ["Ranger", "ranger", "rectification"]

_FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class Ranger(Optimizer):
    r"""Ranger: RAdam with decoupled weight decay, Lookahead and gradient centralisation.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda
                \text{ (weight decay)}, k, \alpha, \tau \text{ (threshold)}, \theta_0, f(\theta) \\
            &\textbf{initialize}: m_0 \leftarrow 0,\; v_0 \leftarrow 0,\; \phi \leftarrow \theta_0,\;
                \rho_\infty \leftarrow 2/(1-\beta_2) - 1 \\[-1.ex]
            &\rule{110mm}{0.4pt} \\
            &\textbf{for}\: t=1 \:\textbf{to}\: \ldots \:\textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \quad (\text{negated if maximize}) \\
            &\hspace{5mm}\textbf{if}\: \text{use\_gc and } \dim g_t > 1
                \;(\text{gc\_conv\_only}: \dim g_t > 3): \\
            &\hspace{10mm} g_t \leftarrow g_t - \operatorname{mean}_{\text{dims } 1..n-1}(g_t) \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\hspace{5mm}\rho_t \leftarrow \rho_\infty - 2t\beta_2^t/(1-\beta_2^t) \\
            &\hspace{5mm}\textbf{if}\: \rho_t > \tau: \\
            &\hspace{10mm} r_t \leftarrow \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}
                {(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
            &\hspace{10mm}\theta_t \leftarrow \theta_t - \gamma\, r_t\,
                \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, \frac{m_t}{\sqrt{v_t} + \epsilon} \\
            &\hspace{5mm}\textbf{else}: \\
            &\hspace{10mm}\theta_t \leftarrow \theta_t - \gamma\, m_t / (1-\beta_1^t) \\
            &\hspace{5mm}\textbf{if}\: \text{lookahead and } t \bmod k = 0: \\
            &\hspace{10mm}\phi \leftarrow \phi + \alpha(\theta_t - \phi);\quad \theta_t \leftarrow \phi \\
            &\rule{110mm}{0.4pt} \\[-1.ex]
            &\bf{return}\: \theta_t
       \end{aligned}

    RAdam: `On the Variance of the Adaptive Learning Rate and Beyond
    <https://arxiv.org/abs/1908.03265>`_. Lookahead: `Lookahead Optimizer: k steps forward,
    1 step back <https://arxiv.org/abs/1907.08610>`_. Gradient centralisation: `Gradient
    Centralization <https://arxiv.org/abs/2004.01461>`_. Ranger (the combination and its
    defaults): https://github.com/lessw2020/Ranger-Deep-Learning-Optimizer.

    It equals ``torch.optim.RAdam(decoupled_weight_decay=True)`` followed by a Lookahead step every
    ``k`` steps, and ``pytorch_ranger.Ranger`` / ``pytorch_optimizer.Ranger(degenerated_to_sgd=True)``
    (tested to <= 5e-7). Differences from the reference implementations, on purpose:

    * ``eps`` is added to the raw ``sqrt(v_t)`` (the torch convention), not to the bias-corrected one.
    * Gradient centralisation works on a copy: ``p.grad`` is never modified.
    * Unrectified steps (``rho_t <= threshold``) are SGD steps with bias-corrected momentum, never
      skipped or reversed (``pytorch_optimizer.Ranger``'s default reverses them).
    * GC skips tensors whose centralised dimensions hold one value (fan-in 1: ``Linear(1, H)``,
      ``Embedding(n, 1)``, a 1x1 conv on one channel): the references centralise them to an
      all-zero gradient, so those weights never train.
    * ``k``, ``alpha``, ``threshold``, ``use_gc`` and ``gc_conv_only`` are per param group: visible to
      schedulers and saved in ``state_dict()``.

    Lookahead clock: each parameter counts its own steps in ``state["step"]`` and syncs with its slow
    buffer after its own steps ``k, 2k, ...``. A parameter whose ``grad`` is ``None`` is skipped
    entirely (no decay, no moment update, no step count), so its clock lags behind the others.

    State per parameter: ``step`` (a float32 scalar tensor on the CPU, as torch keeps it),
    ``exp_avg``, ``exp_avg_sq`` and ``slow_buffer``, each shaped and typed like the parameter, so
    ``3 * numel * element_size`` bytes per parameter (12 bytes per fp32 value, 6 per bf16 value).
    The state keeps the parameter's precision: a bfloat16 parameter gets bfloat16 moments and slow
    weights, as ``torch.optim.AdamW`` does. Keep an fp32 master copy if that is not enough.

    ``torch.amp.GradScaler`` works as with any optimizer that does its own unscaling: the scaler
    unscales the gradients and does not call ``step()`` when it finds inf/NaN, so a skipped step
    advances neither ``step`` nor the Lookahead clock.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate.
        betas: coefficients for the running averages of the gradient and its square.
        eps: added to ``sqrt(v_t)`` for numerical stability.
        weight_decay: decoupled weight decay, scaled by ``lr`` (as AdamW).
        k: Lookahead synchronisation period in steps.
        alpha: Lookahead slow step size, in (0, 1]; 1 makes Lookahead a no-op.
        threshold: rectify when ``rho_t > threshold``; must be >= 4 (below, ``r_t`` is imaginary).
        use_gc: apply gradient centralisation.
        gc_conv_only: centralise only tensors with more than 3 dimensions (conv kernels).
        maximize: maximise the objective instead of minimising.
        foreach: use the ``torch._foreach_*`` implementation. ``None`` picks the fastest available.
        fused: the fused step (see the module docstring). ``None`` picks it when every parameter
            is on a device and dtype torch's fused kernels support (CPU, CUDA, ...; float16/32/64,
            bfloat16). On the CPU with float32 this is a one-pass C kernel that the first step
            builds with the system C compiler (``$CC`` or ``cc``, about a second, logged at INFO,
            cached in ``$RANGERDL_CACHE`` or ``~/.cache/rangerdl``); without a compiler it warns
            once and uses torch's fused AdamW kernel. ``RANGERDL_CPU_KERNEL=0`` turns it off.
        lookahead: keep slow weights and take the Lookahead step. ``False`` leaves RAdam with
            gradient centralisation (no ``slow_buffer``): the inner step of distributed Ranger,
            whose ``rangerdl.distributed.OuterSync`` holds the slow weights across workers
            (``rangerdl.distributed.distributed_ranger`` builds both).

    Raises:
        ValueError: a hyperparameter out of range (named), complex parameters, ``fused=True`` on
            an unsupported device or dtype, ``fused=True`` with ``foreach=True``.

    Warns:
        RuntimeWarning: (once per process) the one-pass CPU kernel cannot be built.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        threshold: float = 5.0,
        use_gc: bool = True,
        gc_conv_only: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        lookahead: bool = True,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "k": k,
            "alpha": alpha,
            "threshold": threshold,
            "use_gc": use_gc,
            "gc_conv_only": gc_conv_only,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "lookahead": lookahead,
        }
        _validate_hyperparameters(defaults)
        if fused and foreach:
            raise ValueError("Ranger: fused=True and foreach=True cannot both be set")
        super().__init__(params, defaults)
        # Reusable buffers for gradient centralisation on the fused path; not state, never saved.
        self._gc_scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hyperparameters(group)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(
                    "Ranger does not support complex parameters; pass torch.view_as_real(p) instead"
                )
            if not p.is_floating_point():
                raise ValueError(
                    f"Ranger: a parameter has dtype {p.dtype}; only floating point parameters "
                    "can be optimised"
                )
        if group["fused"]:
            _check_fused_support(group["params"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._gc_scratch = {}
        for group in self.param_groups:
            for key in ("k", "alpha", "threshold", "use_gc", "gc_conv_only"):
                group.setdefault(key, self.defaults.get(key))
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("lookahead", True)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        slow_buffers: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        lookahead, states = group["lookahead"], self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Ranger does not support sparse gradients")
            state = states[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if lookahead:
                if "slow_buffer" not in state:  # the slow weights start at theta_0
                    state["slow_buffer"] = p.detach().clone(memory_format=torch.preserve_format)
                slow_buffers.append(state["slow_buffer"])
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: re-evaluates the model and returns the loss; run with grad enabled.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            slow_buffers: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, slow_buffers, state_steps)
            ranger(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                slow_buffers=slow_buffers if group["lookahead"] else None,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                threshold=group["threshold"],
                use_gc=group["use_gc"],
                gc_conv_only=group["gc_conv_only"],
                maximize=group["maximize"],
                k=group["k"],
                alpha=group["alpha"],
                foreach=group["foreach"],
                fused=group["fused"],
                gc_scratch=self._gc_scratch,
            )
        return loss

    def slow_weights(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, slow weights)`` for every parameter that has them (stepped at least once,
        ``lookahead=True``): the model worth evaluating and keeping; between syncs the parameters
        hold the fast weights. See :func:`rangerdl.optim.use_slow_weights`."""
        return slow_buffers(self)


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    lr, (beta1, beta2) = group["lr"], group["betas"]
    if isinstance(lr, Tensor):
        raise ValueError("Ranger: lr must be a Python float, not a Tensor")
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Ranger: invalid lr {lr}; expected a finite number >= 0")
    if not 0.0 < group["eps"] < math.inf:
        raise ValueError(
            f"Ranger: invalid eps {group['eps']}; expected a finite number > 0 (with eps = 0 a "
            "weight whose gradient is exactly zero becomes 0/0 = NaN once rectified)"
        )
    if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Ranger: invalid betas {group['betas']}; expected each in [0, 1)")
    if not 0.0 <= group["weight_decay"] < math.inf:
        raise ValueError(f"Ranger: invalid weight_decay {group['weight_decay']}; expected >= 0")
    k = group["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Ranger: invalid k {k!r}; expected an int >= 1")
    if not 0.0 < group["alpha"] <= 1.0:
        raise ValueError(f"Ranger: invalid alpha {group['alpha']}; expected in (0, 1]")
    if not group["threshold"] >= 4.0:
        raise ValueError(
            f"Ranger: invalid threshold {group['threshold']}; expected >= 4 "
            "(below 4 the rectification term is the square root of a negative number)"
        )


def _check_fused_support(params: Iterable[Tensor]) -> None:
    devices = _get_fused_kernels_supported_devices()
    for p in params:
        if p.device.type not in devices or p.dtype not in _FUSED_DTYPES:
            raise ValueError(
                f"Ranger(fused=True) needs floating point parameters on {devices}; "
                f"got {p.dtype} on {p.device}"
            )


def _fused_ok(kind: tuple[torch.device | None, torch.dtype | None]) -> bool:
    """Whether the fused path takes parameters of this ``(device, dtype)``."""
    device, dtype = kind
    return (
        device is not None
        and device.type in _get_fused_kernels_supported_devices()
        and dtype in _FUSED_DTYPES
    )


def _foreach_ok(kind: tuple[torch.device | None, torch.dtype | None]) -> bool:
    device = kind[0]
    return device is None or device.type in [*_get_foreach_kernels_supported_devices(), "cpu"]


def _centralisable(g: Tensor, min_dim: int) -> bool:
    """GC applies to tensors of more than ``min_dim`` dimensions whose centralised dimensions
    (1..n-1) hold more than one value: with one value (fan-in 1: ``Linear(1, H)``, ``Embedding(n,
    1)``, a 1x1 conv on one channel) centralising would zero the gradient for good."""
    return g.dim() > min_dim and g.numel() > g.shape[0]


def _centralize(
    grads: list[Tensor], *, use_gc: bool, gc_conv_only: bool, maximize: bool
) -> list[Tensor]:
    """The gradients the update uses: negated if ``maximize``, centralised if ``use_gc``.

    Returns new tensors where anything changes; ``p.grad`` is never written.
    """
    min_dim = 3 if gc_conv_only else 1
    out = []
    for g in grads:
        if maximize:
            g = -g
        if use_gc and _centralisable(g, min_dim):
            g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
        out.append(g)
    return out


def ranger(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    threshold: float,
    use_gc: bool,
    gc_conv_only: bool,
    maximize: bool,
    k: int,
    alpha: float,
    slow_buffers: list[Tensor] | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    gc_scratch: dict[tuple[torch.device, torch.dtype], Tensor] | None = None,
) -> None:
    """Functional Ranger (see :class:`Ranger` for the math), in place: the RAdam step with
    gradient centralisation on every parameter, then the Lookahead step on those whose new step
    count is a multiple of ``k``.

    Every list holds one tensor per parameter, shaped like it; ``state_steps`` are float32 scalar
    tensors, each advanced by one. ``slow_buffers=None`` skips Lookahead (RAdam + GC only).
    ``gc_scratch`` is a cache of reusable buffers for the fused path's gradient centralisation
    (filled on first use).

    Raises:
        ValueError: complex parameters; ``fused=True`` on an unsupported device or dtype.
    """
    if not params:
        return
    if any(map(torch.is_complex, params)):
        raise ValueError(
            "Ranger does not support complex parameters; pass torch.view_as_real(p) instead"
        )
    if torch.compiler.is_compiling():
        # Inductor traces the foreach ops but cannot functionalise the fused kernel's in-place
        # update of tensors made inside the graph; the math is the same.
        fused, foreach = False, True
    # Parameter indices per (device, dtype), grouped in C++ as torch's own optimizers do.
    by_kind = {
        kind: idx
        for kind, (_, idx) in Optimizer._group_tensors_by_device_and_dtype(
            [cast(list[Tensor | None], params)], with_indices=True
        ).items()
    }
    if fused is None:
        fused = foreach is not True and all(map(_fused_ok, by_kind))
    elif fused:
        _check_fused_support(params)
    if foreach is None:
        foreach = all(map(_foreach_ok, by_kind))

    torch._foreach_add_(state_steps, 1)
    steps = list(map(int, torch.stack(state_steps).tolist()))

    hyper: dict[str, Any] = {
        "beta1": beta1,
        "beta2": beta2,
        "lr": lr,
        "weight_decay": weight_decay,
        "eps": eps,
        "threshold": threshold,
        "use_gc": use_gc,
        "gc_conv_only": gc_conv_only,
        "maximize": maximize,
    }
    synced: set[int] = set()  # Lookahead already folded into the step
    if fused or foreach:
        # One bucket per (device, dtype, step): the scalars of a kernel call must be shared.
        buckets: dict[tuple[Any, Any, int], list[int]] = defaultdict(list)
        one_step = steps.count(steps[0]) == len(steps)  # the usual case
        for (device, dtype), idx in by_kind.items():
            if one_step:
                buckets[(device, dtype, steps[0])] = idx
                continue
            for i in idx:
                buckets[(device, dtype, steps[i])].append(i)
        for (_, _, step), idx in buckets.items():
            sync = slow_buffers is not None and step % k == 0
            if fused and _one_pass_step(
                idx, params, grads, exp_avgs, exp_avg_sqs, slow_buffers if sync else None,
                step=step, alpha=alpha, **hyper,
            ):  # fmt: skip
                synced.update(idx if sync else ())
                continue
            ps, gs, ms, vs, ts = _pick(idx, params, grads, exp_avgs, exp_avg_sqs, state_steps)
            _multi_tensor_ranger(
                ps, gs, ms, vs, ts, step, fused=fused, gc_scratch=gc_scratch, **hyper
            )
    else:
        for i in range(len(params)):
            _single_tensor_ranger(
                params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], **hyper
            )
    if slow_buffers is not None:
        due = [i for i, s in enumerate(steps) if s % k == 0 and i not in synced]
        _, slow = _pick(due, params, slow_buffers)
        lookahead_([params[i] for i in due], slow, alpha, foreach=foreach)


def _step_size(
    step: int, lr: float, beta1: float, beta2: float, threshold: float
) -> tuple[float | None, float]:
    """``(r_t, step size)`` of RAdam's step ``step`` (Liu et al. 2020): rectified (``r_t`` not
    None), the parameter moves by ``-size * m / (sqrt(v) + eps)`` with ``size = lr r_t
    sqrt(1 - beta2^t) / (1 - beta1^t)``; before that by ``-size * m`` with ``size = lr / (1 -
    beta1^t)`` (SGD with bias-corrected momentum)."""
    bias_correction1 = 1 - beta1**step
    rect = rectification(step, beta2, threshold)
    if rect is None:
        return None, lr / bias_correction1
    return rect, lr * rect * math.sqrt(1 - beta2**step) / bias_correction1


def _one_pass_step(
    idx: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    slow_buffers: list[Tensor] | None,
    *,
    step: int,
    alpha: float,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    threshold: float,
    use_gc: bool,
    gc_conv_only: bool,
    maximize: bool,
) -> bool:
    """The whole step of one bucket (and its Lookahead step when ``slow_buffers`` is given) in
    rangerdl's one-pass CPU kernel. ``False`` (nothing done) where the kernel does not apply:
    not contiguous float32 on the CPU, or no C compiler."""
    lists = _pick(
        idx, params, grads, exp_avgs, exp_avg_sqs, *([] if slow_buffers is None else [slow_buffers])
    )
    if not _cpu_kernel.applies(
        params[idx[0]].device, params[idx[0]].dtype, [t for lst in lists for t in lst]
    ):
        return False
    lib = _cpu_kernel.load()
    if lib is None:
        return False
    ps, gs, ms, vs = lists[:4]
    rect, step_size = _step_size(step, lr, beta1, beta2, threshold)
    _cpu_kernel.step(
        lib,
        ps,
        gs,
        ms,
        vs,
        lists[4] if slow_buffers is not None else None,
        centre_min_dim=(3 if gc_conv_only else 1) if use_gc else None,
        centralisable=_centralisable,
        maximize=maximize,
        decay=1 - lr * weight_decay,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        step_size=step_size,
        rectified=rect is not None,
        alpha=alpha,
    )
    return True


def _single_tensor_ranger(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    threshold: float,
    use_gc: bool,
    gc_conv_only: bool,
    maximize: bool,
) -> None:
    (grad,) = _centralize([grad], use_gc=use_gc, gc_conv_only=gc_conv_only, maximize=maximize)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    rect, step_size = _step_size(step, lr, beta1, beta2, threshold)
    if rect is None:
        param.add_(exp_avg, alpha=-step_size)
    else:
        param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size)


def _multi_tensor_ranger(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    step: int,
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    threshold: float,
    use_gc: bool,
    gc_conv_only: bool,
    maximize: bool,
    fused: bool,
    gc_scratch: dict[tuple[torch.device, torch.dtype], Tensor] | None,
) -> None:
    """One bucket: every tensor on one device, of one dtype, at one step."""
    bias_correction2 = 1 - beta2**step
    rect, step_size = _step_size(step, lr, beta1, beta2, threshold)

    if fused and rect is not None:
        # RAdam's rectified step is AdamW with lr' = lr r_t, eps' = eps / sqrt(bc2), wd' = wd / r_t.
        _fused_rectified_step(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            step,
            gc_min_dim=(3 if gc_conv_only else 1) if use_gc else None,
            gc_scratch=gc_scratch,
            lr=lr * rect,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay / rect,
            eps=eps / math.sqrt(bias_correction2),
            maximize=maximize,
        )
        return

    grads = _centralize(grads, use_gc=use_gc, gc_conv_only=gc_conv_only, maximize=maximize)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if rect is None:
        torch._foreach_add_(params, exp_avgs, alpha=-step_size)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, cast(list[Tensor], denom), value=-step_size)


# Centralised gradients are written a block of rows at a time into this much scratch, and the fused
# kernel runs on the block while it is still in cache: GC then costs about one extra read of the
# gradient instead of three passes over memory (mean, subtract-and-write, kernel read).
GC_SCRATCH_BYTES = 8 << 20


def _fused_rectified_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step: int,
    *,
    gc_min_dim: int | None,
    gc_scratch: dict[tuple[torch.device, torch.dtype], Tensor] | None,
    **adamw: Any,
) -> None:
    device = params[0].device
    step_t = torch.tensor(float(step), dtype=torch.float32, device=device)
    # The fused kernel walks a gradient's memory in its parameter's order: give it that layout.
    grads = [
        g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        for p, g in zip(params, grads, strict=True)
    ]

    def kernel(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> None:
        torch._fused_adamw_(
            ps,
            gs,
            ms,
            vs,
            [],
            [step_t] * len(ps),
            amsgrad=False,
            grad_scale=None,
            found_inf=None,
            **adamw,
        )

    central = [
        i for i, g in enumerate(grads) if gc_min_dim is not None and _centralisable(g, gc_min_dim)
    ]
    plain = sorted(set(range(len(params))) - set(central))
    if plain:
        kernel(*_pick(plain, params, grads, exp_avgs, exp_avg_sqs))
    if not central:
        return
    blockable = [
        i
        for i in central
        if device.type == "cpu"
        and all(t.is_contiguous() for t in (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]))
    ]
    whole = [i for i in central if i not in set(blockable)]
    if whole:
        ps, gs, ms, vs = _pick(whole, params, grads, exp_avgs, exp_avg_sqs)
        kernel(
            ps, _centralize(gs, use_gc=True, gc_conv_only=gc_min_dim == 3, maximize=False), ms, vs
        )
    if not blockable:
        return

    row_max = max(grads[i][0].numel() for i in blockable)
    dtype = grads[blockable[0]].dtype
    numel = max(row_max, GC_SCRATCH_BYTES // grads[blockable[0]].element_size())
    scratch = gc_scratch.get((device, dtype)) if gc_scratch is not None else None
    if scratch is None or scratch.numel() < numel:
        scratch = torch.empty(numel, dtype=dtype, device=device)
        if gc_scratch is not None:
            gc_scratch[(device, dtype)] = scratch
    pending: tuple[list[Tensor], ...] = ([], [], [], [])
    used = 0
    for i in blockable:
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        row, dims = g[0].numel(), tuple(range(1, g.dim()))
        r = 0
        while r < g.shape[0]:
            take = min((scratch.numel() - used) // row, g.shape[0] - r)
            if take == 0:
                kernel(*pending)
                pending, used = ([], [], [], []), 0
                continue
            block = g[r : r + take]
            buf = scratch[used : used + take * row].view(block.shape)
            torch.sub(block, block.mean(dim=dims, keepdim=True), out=buf)
            for lst, t in zip(
                pending, (p[r : r + take], buf, m[r : r + take], v[r : r + take]), strict=True
            ):
                lst.append(t)
            used += take * row
            r += take
    if pending[0]:
        kernel(*pending)


def _pick(idx: list[int], *lists: list[Tensor]) -> tuple[list[Tensor], ...]:
    if len(idx) == len(lists[0]):  # idx lists every index, in order: nothing to pick
        return lists
    return tuple([lst[i] for i in idx] for lst in lists)
