"""rangerdl.keras equals rangerdl.optim (PyTorch) step by step, on whichever Keras backend runs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from reference import keras_trajectory, torch_trajectory

import rangerdl.optim
from rangerdl.keras import Lookahead, Ranger

STEPS = 36  # steps 1-5 (unrectified), 6 (first rectified, first sync), 12, ... 36
TOL = 1e-6


def _max_diff_per_step(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).max(axis=1)


@pytest.mark.parametrize("use_gc", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_ranger_matches_torch_ranger(use_gc: bool, weight_decay: float) -> None:
    hyper = {"lr": 1e-2, "eps": 1e-5, "weight_decay": weight_decay, "use_gc": use_gc}
    ours = keras_trajectory(
        Ranger(learning_rate=1e-2, epsilon=1e-5, weight_decay=weight_decay, use_gc=use_gc),
        STEPS,
    )
    ref = torch_trajectory(lambda p: rangerdl.optim.Ranger(p, **hyper), STEPS)
    diff = _max_diff_per_step(ours, ref)
    assert diff.max() <= TOL, f"first step over {TOL}: {int(np.argmax(diff > TOL)) + 1}"
    # the run moved the weights far more than the tolerance, and Lookahead did sync
    assert np.abs(ref[-1] - ref[0]).max() > 100 * TOL


def test_ranger_matches_torch_with_other_hyperparameters() -> None:
    """gc_conv_only, betas, k, alpha < 0.5 (the other branch of lerp), threshold."""
    kwargs = {"k": 4, "alpha": 0.3, "threshold": 6.0, "gc_conv_only": True}
    ours = keras_trajectory(
        Ranger(learning_rate=5e-3, beta_1=0.9, beta_2=0.99, epsilon=1e-6, **kwargs), STEPS
    )
    ref = torch_trajectory(
        lambda p: rangerdl.optim.Ranger(p, lr=5e-3, betas=(0.9, 0.99), eps=1e-6, **kwargs),
        STEPS,
    )
    assert _max_diff_per_step(ours, ref).max() <= TOL


def test_gc_off_differs_from_gc_on() -> None:
    """Negative control: the problem's gradients have means that GC removes."""
    on = keras_trajectory(Ranger(learning_rate=1e-2), 8)
    off = keras_trajectory(Ranger(learning_rate=1e-2, use_gc=False), 8)
    assert np.abs(on - off).max() > 1e-3


def test_ranger_with_a_schedule_matches_torch_with_the_same_lr_each_step() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=5, decay_rate=0.7)
    ours = keras_trajectory(Ranger(learning_rate=schedule, weight_decay=0.1), STEPS)
    ref = torch_trajectory(
        lambda p: rangerdl.optim.Ranger(p, lr=1e-2, weight_decay=0.1),
        STEPS,
        lr_at=lambda t: 1e-2 * 0.7 ** (t / 5),  # Keras evaluates the schedule at iterations = t
    )
    assert _max_diff_per_step(ours, ref).max() <= TOL


def test_ranger_eager_matches_torch_ranger() -> None:
    """The same without tf.function / jax.jit (op by op)."""
    ours = keras_trajectory(Ranger(learning_rate=1e-2, weight_decay=0.1), 14, compiled=False)
    ref = torch_trajectory(lambda p: rangerdl.optim.Ranger(p, lr=1e-2, weight_decay=0.1), 14)
    assert _max_diff_per_step(ours, ref).max() <= TOL


def _adamw_pair(lr: float, wd: float, k: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    # Keras adds epsilon to sqrt(v), torch to sqrt(v / (1 - beta2^t)): with epsilon 0 both make
    # the same update, so the comparison tests Lookahead, not the two AdamW conventions.
    ours = keras_trajectory(
        Lookahead(
            keras.optimizers.AdamW(learning_rate=lr, weight_decay=wd, epsilon=0.0),
            k=k,
            alpha=alpha,
        ),
        STEPS,
    )
    ref = torch_trajectory(
        lambda p: rangerdl.optim.Lookahead(
            torch.optim.AdamW(p, lr=lr, weight_decay=wd, eps=0.0), k=k, alpha=alpha
        ),
        STEPS,
    )
    return ours, ref


def test_lookahead_adamw_matches_torch_lookahead_adamw() -> None:
    ours, ref = _adamw_pair(lr=1e-3, wd=0.0, k=5, alpha=0.5)
    assert _max_diff_per_step(ours, ref).max() <= TOL
    plain = keras_trajectory(keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.0), STEPS)
    assert np.abs(plain - ref).max() > 100 * TOL  # negative control: the slow step matters


def test_lookahead_adamw_with_decay_is_as_close_as_plain_adamw_is() -> None:
    """Keras AdamW computes its bias corrections in float32 and decays as ``v - v wd lr``, so
    it drifts from torch AdamW by ~1e-6 over 36 steps at lr 1e-3 by itself; Lookahead adds none.
    """
    ours, ref = _adamw_pair(lr=1e-3, wd=0.05, k=4, alpha=0.3)
    plain = keras_trajectory(
        keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.05, epsilon=0.0), STEPS
    )
    plain_ref = torch_trajectory(
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, eps=0.0), STEPS
    )
    inner_gap = np.abs(plain - plain_ref).max()
    assert _max_diff_per_step(ours, ref).max() <= max(TOL, 1.5 * inner_gap)


@pytest.mark.parametrize("k, alpha", [(6, 1.0), (STEPS + 1, 0.5)])
def test_lookahead_is_the_identity_when_it_never_moves_the_weights(k: int, alpha: float) -> None:
    """alpha = 1, or k beyond the run: exactly the inner optimizer."""
    ours = keras_trajectory(Lookahead(keras.optimizers.SGD(0.05, momentum=0.9), k, alpha), STEPS)
    plain = keras_trajectory(keras.optimizers.SGD(0.05, momentum=0.9), STEPS)
    np.testing.assert_array_equal(ours, plain)
