"""Ranger for Keras 3: RAdam + Lookahead + gradient centralisation in ``keras.ops``."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from rangerdl.keras._coefficients import TABLE_STEPS, first_rectified_step, step_factors
from rangerdl.keras._lookahead_step import (
    add_slow_variables,
    lerp,
    lookahead_sync,
    validate_k_alpha,
)

__all__ = ["Ranger"]


@keras.saving.register_keras_serializable(package="rangerdl")
class Ranger(keras.optimizers.Optimizer):
    r"""Ranger: RAdam with decoupled weight decay, Lookahead and gradient centralisation.

    The algorithm and defaults of ``rangerdl.optim.Ranger`` (PyTorch), with Keras argument names;
    tested step by step against it on the TensorFlow, JAX and PyTorch backends. Per variable, at
    step ``t = iterations + 1``::

        if use_gc and g.ndim > 1 (gc_conv_only: > 3):  g = g - mean(g, axes 0..n-2)
        theta *= 1 - learning_rate * weight_decay
        m = beta_1 m + (1 - beta_1) g ;  v = beta_2 v + (1 - beta_2) g^2
        rho_inf = 2 / (1 - beta_2) - 1 ;  rho_t = rho_inf - 2 t beta_2^t / (1 - beta_2^t)
        if rho_t > threshold:
            r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
            theta -= lr r_t sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)
        else:                                          # steps 1-5: SGD with momentum
            theta -= lr m / (1 - beta_1^t)
        if t % k == 0:  phi = phi + alpha (theta - phi) ;  theta = phi

    Gradient centralisation and Keras layouts: PyTorch centralises each *output unit* of a
    weight, which is axis 0 of a torch weight (``Linear``: (out, in), ``Conv2d``: (out, in, kh,
    kw)), so it averages over axes 1..n-1. Keras puts the output axis last (``Dense``: (in, out),
    ``Conv2D``: (kh, kw, in, out), ``LSTM``: (in, 4 units)), so here the mean is over every axis
    but the last: axes 0..n-2. A Keras model is then centralised exactly as the same torch model
    is. Exception: an ``Embedding`` table is (vocab, dim) in both frameworks; torch centralises it
    per token (row), this per embedding dimension (column).

    Differences from ``rangerdl.optim.Ranger``, all forced by Keras: hyperparameters are per
    optimizer, not per group; the Lookahead clock is the optimizer's ``iterations`` (shared by
    all variables, so a variable without a gradient in a step still syncs with the others);
    the slow weights start at the variables' values when the optimizer is *built* (``fit`` builds
    it before the first step; torch takes them at the first step). ``weight_decay`` follows
    ``exclude_from_weight_decay``. Keras' base-class options (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
    ``loss_scale_factor``, ``gradient_accumulation_steps``) work as on any Keras optimizer; with
    gradient accumulation, ``t`` counts the real updates.

    The step-size scalars of the first 1024 steps are computed in float64 when the optimizer is
    made (RAdam's rectification loses up to 4e-4 in float32, which is all JAX has by default);
    later steps use the formula in float32, accurate to < 1e-6 there.

    State per variable: ``momentum``, ``velocity`` and ``slow`` (the Lookahead slow weights), each
    shaped and typed like the variable; all are optimizer variables, so ``model.save()`` keeps
    them and ``keras.models.load_model`` restores them.

    Args:
        learning_rate: a float, a ``keras.optimizers.schedules.LearningRateSchedule`` or a
            callable returning the rate.
        beta_1: decay rate of the gradient's running average, in [0, 1).
        beta_2: decay rate of the squared gradient's running average, in [0, 1).
        epsilon: added to ``sqrt(v)`` (the raw one, as torch does; TFA added it to the
            bias-corrected one).
        weight_decay: decoupled weight decay, scaled by the learning rate (as AdamW).
        k: Lookahead synchronisation period in steps.
        alpha: Lookahead slow step size, in (0, 1]; 1 makes Lookahead a no-op.
        threshold: rectify when ``rho_t > threshold``; must be >= 4.
        use_gc: apply gradient centralisation.
        gc_conv_only: centralise only variables with more than 3 axes (convolution kernels).
        **kwargs: Keras' base optimizer options (``name``, ``clipnorm``, ``use_ema``, ...).
    """

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        beta_1: float = 0.95,
        beta_2: float = 0.999,
        epsilon: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        threshold: float = 5.0,
        use_gc: bool = True,
        gc_conv_only: bool = False,
        **kwargs: Any,
    ) -> None:
        _validate(learning_rate, beta_1, beta_2, epsilon, weight_decay, threshold)
        validate_k_alpha("Ranger", k, alpha)
        if isinstance(learning_rate, int) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.k = k
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.use_gc = bool(use_gc)
        self.gc_conv_only = bool(gc_conv_only)
        self._factors, self._rectified = step_factors(self.beta_1, self.beta_2, self.threshold)
        self._first_rectified = first_rectified_step(self.beta_2, self.threshold)
        self._coefficients: tuple[Any, Any] | None = None

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums: list[Any] = []
        self._velocities: list[Any] = []
        for variable in var_list:  # None where Keras overwrites a variable with its gradient
            skip = getattr(variable, "overwrite_with_gradient", False)
            for name, state in (("momentum", self._momentums), ("velocity", self._velocities)):
                state.append(None if skip else self.add_variable_from_reference(variable, name))
        self._slow = add_slow_variables(self, var_list)

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        # Decay is applied inside update_step, in torch's form theta * (1 - lr wd), after GC and
        # before the moments, as rangerdl.optim.Ranger does.
        return

    def _step_coefficients(self) -> tuple[Any, Any]:
        """(factor, rectified) for this step as float32 scalars: see ``step_factors``."""
        step = ops.add(self.iterations, 1)
        index = ops.subtract(ops.minimum(step, TABLE_STEPS), 1)
        table_factor = ops.take(ops.convert_to_tensor(self._factors), index)
        table_rectified = ops.take(ops.convert_to_tensor(self._rectified), index)

        t = ops.cast(step, "float32")
        log_beta1 = math.log(self.beta_1) if self.beta_1 > 0 else -math.inf
        bias_correction1 = ops.negative(ops.expm1(ops.multiply(t, log_beta1)))
        late_factor = ops.divide(1.0, bias_correction1)
        late_rectified = ops.zeros((), "float32")
        if self._first_rectified is not None:
            rho_inf = 2.0 / (1.0 - self.beta_2) - 1.0
            log_beta2 = math.log(self.beta_2)
            bias_correction2 = ops.negative(ops.expm1(ops.multiply(t, log_beta2)))
            beta2_t = ops.exp(ops.multiply(t, log_beta2))
            rho_t = ops.subtract(
                rho_inf, ops.divide(ops.multiply(2.0 * t, beta2_t), bias_correction2)
            )
            rect_sq = ops.divide(
                ops.multiply(ops.multiply(rho_t - 4.0, rho_t - 2.0), rho_inf),
                ops.multiply((rho_inf - 4.0) * (rho_inf - 2.0), rho_t),
            )
            rect = ops.sqrt(ops.maximum(rect_sq, 0.0))
            is_rect = ops.greater_equal(step, self._first_rectified)
            late_factor = ops.where(
                is_rect,
                ops.divide(ops.multiply(rect, ops.sqrt(bias_correction2)), bias_correction1),
                late_factor,
            )
            late_rectified = ops.cast(is_rect, "float32")
        in_table = ops.less_equal(step, TABLE_STEPS)
        factor = ops.where(in_table, table_factor, late_factor)
        rectified = ops.where(in_table, table_rectified, late_rectified)
        return factor, rectified

    def _backend_update_step(
        self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any
    ) -> None:
        # The step scalars once per step, not once per variable; then RAdam + GC for every
        # variable (the backend's loop), then one Lookahead sync for all of them.
        self._coefficients = self._step_coefficients()
        super()._backend_update_step(grads, trainable_variables, learning_rate)
        self._coefficients = None
        due = ops.equal(ops.mod(ops.add(self.iterations, 1), self.k), 0)
        slow = [self._slow[self._get_variable_index(v)] for v in trainable_variables]
        lookahead_sync(self, due, trainable_variables, slow, self.alpha)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """RAdam with GC and decoupled decay for one variable (the Lookahead step comes after)."""
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        coefficients = self._coefficients or self._step_coefficients()
        factor, rectified = (ops.cast(c, dtype) for c in coefficients)

        ndim = len(grad.shape)
        if self.use_gc and ndim > (3 if self.gc_conv_only else 1):
            grad = ops.subtract(grad, ops.mean(grad, axis=tuple(range(ndim - 1)), keepdims=True))
        if self.weight_decay and self._use_weight_decay(variable):
            self.assign(variable, ops.multiply(variable, ops.subtract(1.0, lr * self.weight_decay)))
        new_m = lerp(m, grad, 1.0 - self.beta_1)
        new_v = ops.add(
            ops.multiply(v, self.beta_2), ops.multiply(ops.multiply(grad, 1.0 - self.beta_2), grad)
        )
        self.assign(m, new_m)
        self.assign(v, new_v)
        # rectified: denom = sqrt(v) + eps; not: denom = 1 (plain momentum SGD)
        denom = ops.add(
            ops.multiply(ops.sqrt(new_v), rectified),
            ops.add(ops.multiply(rectified, self.epsilon), ops.subtract(1.0, rectified)),
        )
        self.assign_sub(variable, ops.divide(ops.multiply(ops.multiply(lr, factor), new_m), denom))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "k": self.k,
                "alpha": self.alpha,
                "threshold": self.threshold,
                "use_gc": self.use_gc,
                "gc_conv_only": self.gc_conv_only,
            }
        )
        return config


def _validate(
    learning_rate: Any,
    beta_1: Any,
    beta_2: Any,
    epsilon: Any,
    weight_decay: Any,
    threshold: Any,
) -> None:
    if isinstance(learning_rate, int | float) and not learning_rate >= 0.0:
        raise ValueError(f"Ranger: invalid learning_rate {learning_rate}; expected >= 0")
    for name, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
        if not isinstance(beta, int | float) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Ranger: invalid {name} {beta!r}; expected a float in [0, 1)")
    if not isinstance(epsilon, int | float) or not epsilon >= 0.0:
        raise ValueError(f"Ranger: invalid epsilon {epsilon!r}; expected a float >= 0")
    if weight_decay is not None and not (
        isinstance(weight_decay, int | float) and weight_decay >= 0.0
    ):
        raise ValueError(f"Ranger: invalid weight_decay {weight_decay!r}; expected a float >= 0")
    if not isinstance(threshold, int | float) or not threshold >= 4.0:
        raise ValueError(
            f"Ranger: invalid threshold {threshold!r}; expected >= 4 "
            "(below 4 the rectification term is the square root of a negative number)"
        )
