"""Lookahead around any Keras 3 optimizer."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from rangerdl.keras._lookahead_step import add_slow_variables, lookahead_sync, validate_k_alpha

__all__ = ["Lookahead"]

# Keras' base-class options belong to the inner optimizer: the wrapper only adds the slow step.
_INNER_OPTIONS = {
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


@keras.saving.register_keras_serializable(package="rangerdl")
class Lookahead(keras.optimizers.Optimizer):
    r"""Lookahead (`Zhang et al., 2019 <https://arxiv.org/abs/1907.08610>`_) around any optimizer.

    ::

        phi = theta_0
        for t = 1, 2, ...:
            theta = inner_step(theta)
            if t % k == 0:  phi = phi + alpha (theta - phi) ;  theta = phi

    The same algorithm as ``rangerdl.optim.Lookahead`` (PyTorch) and tested against it around
    AdamW. ``t`` is the inner optimizer's ``iterations``: a step the inner optimizer does not take
    (a gradient-accumulation micro-step, or a step that ``LossScaleOptimizer`` skips for non-finite
    gradients) does not move the clock. The inner optimizer keeps its state (momenta) across syncs.
    The slow weights are optimizer variables (saved by ``model.save()``, restored by
    ``keras.models.load_model``) and start at the variables' values when the optimizer is built.

    The learning rate, ``iterations``, clipping, weight decay, gradient accumulation and loss
    scaling are the inner optimizer's: set them there (passing them here is an error). EMA
    (``use_ema``) on the inner optimizer is refused: it would average the fast weights before the
    slow step; ``rangerdl.keras.Ranger(use_ema=True)`` averages the weights after it.

    Args:
        inner_optimizer: the ``keras.optimizers.Optimizer`` to wrap (AdamW, SGD, ...).
        k: synchronisation period in steps.
        alpha: slow step size, in (0, 1].
        name: the optimizer's name.
    """

    def __init__(
        self,
        inner_optimizer: Any,
        k: int = 6,
        alpha: float = 0.5,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "Lookahead wraps a keras.optimizers.Optimizer, got "
                f"{type(inner_optimizer).__name__}"
            )
        validate_k_alpha("Lookahead", k, alpha)
        for key, default in _INNER_OPTIONS.items():
            if key in kwargs and kwargs.pop(key) != default:
                raise ValueError(
                    f"Lookahead does not take `{key}`: set it on the inner optimizer "
                    f"(Lookahead({type(inner_optimizer).__name__}(..., {key}=...)))"
                )
        if kwargs:
            raise ValueError(f"Lookahead: unknown argument(s) {sorted(kwargs)}")
        if getattr(inner_optimizer, "use_ema", False):
            raise ValueError(
                "Lookahead: the inner optimizer has use_ema=True, which would average the fast "
                "weights before the Lookahead step; use rangerdl.keras.Ranger(use_ema=True) "
                "or an inner optimizer without EMA"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.k = k
        self.alpha = float(alpha)

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        self.inner_optimizer.build(var_list)
        self._slow = add_slow_variables(self, var_list)
        super().build(var_list)

    @property
    def variables(self) -> list[Any]:
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads: Any, trainable_variables: Any = None) -> None:
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "Lookahead.apply: pass trainable_variables on the first call (or build first)"
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        variables = (
            self._trainable_variables if trainable_variables is None else list(trainable_variables)
        )
        before = ops.copy(self.inner_optimizer.iterations)
        self.inner_optimizer.apply(grads, trainable_variables)
        after = self.inner_optimizer.iterations
        due = ops.logical_and(ops.not_equal(after, before), ops.equal(ops.mod(after, self.k), 0))
        slow = [self._slow[self._get_variable_index(v)] for v in variables]
        lookahead_sync(self, due, variables, slow, self.alpha)

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: Any) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "k": self.k,
            "alpha": self.alpha,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Lookahead:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)
