"""rangerdl.keras optimizers as Keras citizens: fit, compiled training, saving, config, mixed
precision, gradient accumulation, clipping, EMA; on whichever backend this process runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from reference import compiled_apply, to_numpy

from rangerdl.keras import Lookahead, Ranger

BACKEND = keras.backend.backend()


def _data(n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (x[:, :3].argmax(axis=1)).astype(np.int32)
    return x, y


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )


def _compile(model: keras.Model, optimizer: Any, **kwargs: Any) -> keras.Model:
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def _weights(model: keras.Model) -> list[np.ndarray]:
    return [to_numpy(w) for w in model.weights]


def _optimizers() -> list[Any]:
    return [
        Ranger(learning_rate=0.1, weight_decay=1e-3),
        Lookahead(keras.optimizers.AdamW(learning_rate=1e-2), k=4),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["Ranger", "Lookahead(AdamW)"])
def test_fit_reduces_the_loss(index: int) -> None:
    x, y = _data()
    model = _compile(_model(), _optimizers()[index])
    history = model.fit(x, y, batch_size=16, epochs=6, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_starts_the_slow_weights_at_the_initial_weights(jit_compile: bool) -> None:
    """With learning rate 0 every sync must give back the initial weights (slow weights that
    started anywhere else, e.g. at zero, would pull the model toward there)."""
    x, y = _data()
    for optimizer in (Ranger(learning_rate=0.0), Lookahead(keras.optimizers.SGD(0.0), k=2)):
        model = _compile(_model(), optimizer, jit_compile=jit_compile and BACKEND != "torch")
        before = _weights(model)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        for a, b in zip(before, _weights(model), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(BACKEND == "torch", reason="jit_compile is tested on TensorFlow and JAX")
def test_jit_compiled_fit_equals_eager_fit() -> None:
    x, y = _data()
    compiled = _compile(_model(), Ranger(learning_rate=1e-2), jit_compile=True)
    eager = _compile(_model(), Ranger(learning_rate=1e-2), run_eagerly=True)
    for model in (compiled, eager):  # 12 steps: syncs at 6 and 12
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(_weights(compiled), _weights(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert not np.allclose(_weights(compiled)[0], _weights(_model())[0], atol=1e-3)


@pytest.mark.parametrize("index", [0, 1], ids=["Ranger", "Lookahead(AdamW)"])
def test_save_and_load_model_continues_training_identically(index: int, tmp_path: Path) -> None:
    x, y = _data(144)
    first, rest = (x, y), (x[:80], y[:80])  # 9 steps (a sync at 6), then 5 (a sync at 12)
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=40)
    optimizer = (
        Ranger(learning_rate=schedule)
        if index == 0
        else Lookahead(keras.optimizers.AdamW(learning_rate=schedule), k=4)
    )
    model = _compile(_model(), optimizer)
    model.fit(*first, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(optimizer)
    assert loaded.optimizer.get_config() == optimizer.get_config()
    assert int(to_numpy(loaded.optimizer.iterations)) == 9
    saved_state = [to_numpy(v) for v in optimizer.variables]
    for a, b in zip(saved_state, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, to_numpy(b))  # slow weights included

    fresh = _compile(_model(), Ranger(learning_rate=schedule))  # negative control: no state
    fresh.set_weights(model.get_weights())
    for m in (model, loaded, fresh):
        m.fit(*rest, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(_weights(model), _weights(loaded), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert not np.allclose(_weights(fresh)[0], _weights(model)[0], atol=1e-5)


def test_get_config_from_config_and_registration() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, 100, 0.9)
    ranger = Ranger(
        learning_rate=schedule,
        beta_1=0.9,
        epsilon=1e-6,
        weight_decay=0.01,
        k=5,
        alpha=0.6,
        threshold=6.0,
        use_gc=False,
        gc_conv_only=True,
        clipnorm=1.0,
    )
    again = Ranger.from_config(ranger.get_config())
    assert again.get_config() == ranger.get_config()
    assert keras.saving.get_registered_name(Ranger) == "rangerdl>Ranger"
    assert keras.saving.get_registered_name(Lookahead) == "rangerdl>Lookahead"
    wrapped = Lookahead(keras.optimizers.AdamW(learning_rate=2e-3), k=3, alpha=0.25)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(wrapped))
    assert isinstance(restored, Lookahead)
    assert isinstance(restored.inner_optimizer, keras.optimizers.AdamW)
    assert restored.get_config() == wrapped.get_config()


def _grads(seed: int, steps: int, scale: float = 1.0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [scale * rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (3,))]
        for _ in range(steps)
    ]


def _run(optimizer: Any, grads: list[list[np.ndarray]], compiled: bool = True) -> list[Any]:
    rng = np.random.default_rng(1)
    variables = [keras.Variable(rng.standard_normal(s).astype(np.float32)) for s in ((4, 3), (3,))]
    apply = (
        compiled_apply(optimizer, variables)
        if compiled
        else lambda g: optimizer.apply(g, variables)
    )
    for g in grads:
        apply([keras.ops.convert_to_tensor(a) for a in g])
    return [to_numpy(v) for v in variables]


def _assert_close(a: list[np.ndarray], b: list[np.ndarray], atol: float = 1e-6) -> None:
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=0, atol=atol)


def test_loss_scale_optimizer_unscales_and_skips_non_finite_steps() -> None:
    grads = _grads(0, 8)
    scale = 2.0**10
    inf_step = [np.full((4, 3), np.inf, np.float32), np.zeros(3, np.float32)]
    scaled = [[g * scale for g in step] for step in grads]
    scaled.insert(5, inf_step)  # skipped: the clock stays at 5, the scale halves
    lso = keras.optimizers.LossScaleOptimizer(Ranger(learning_rate=0.05), initial_scale=scale)
    # after the skip the scale is 2^9: rescale the later gradients to it
    scaled = [[g / 2 for g in step] if i > 5 else step for i, step in enumerate(scaled)]
    ours = _run(lso, scaled)
    _assert_close(ours, _run(Ranger(learning_rate=0.05), grads))
    assert int(to_numpy(lso.iterations)) == 8


def test_mixed_precision_fit_wraps_ranger_in_a_loss_scale_optimizer() -> None:
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _data()
    for optimizer in _optimizers():
        model = _compile(_model(), optimizer)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert history.history["loss"][-1] < history.history["loss"][0]


def test_gradient_accumulation_equals_the_averaged_gradient() -> None:
    micro = _grads(0, 16)  # 8 real steps: rectified from 6, a sync at 6
    averaged = [
        [(a + b) / 2 for a, b in zip(micro[i], micro[i + 1], strict=True)] for i in range(0, 16, 2)
    ]
    _assert_close(
        _run(Ranger(learning_rate=0.05, gradient_accumulation_steps=2), micro),
        _run(Ranger(learning_rate=0.05), averaged),
    )
    _assert_close(
        _run(Lookahead(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), k=3), micro),
        _run(Lookahead(keras.optimizers.SGD(0.1), k=3), averaged),
    )


def test_clipnorm_clips_each_gradient_before_the_step() -> None:
    grads = _grads(0, 8, scale=10.0)
    clipped = [[g * min(1.0, 0.5 / float(np.linalg.norm(g))) for g in step] for step in grads]
    _assert_close(
        _run(Ranger(learning_rate=0.05, clipnorm=0.5), grads),
        _run(Ranger(learning_rate=0.05), clipped),
    )


def test_ema_averages_the_weights_after_the_lookahead_step() -> None:
    grads = _grads(0, 8)
    trajectory = [_run(Ranger(learning_rate=0.05), grads[: t + 1]) for t in range(len(grads))]
    average = [w.copy() for w in trajectory[0]]
    for weights in trajectory[1:]:
        average = [0.8 * a + 0.2 * w for a, w in zip(average, weights, strict=True)]
    optimizer = Ranger(learning_rate=0.05, use_ema=True, ema_momentum=0.8)
    rng = np.random.default_rng(1)
    variables = [keras.Variable(rng.standard_normal(s).astype(np.float32)) for s in ((4, 3), (3,))]
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(a) for a in g], variables)
    _assert_close([to_numpy(v) for v in variables], trajectory[-1])
    optimizer.finalize_variable_values(variables)
    _assert_close([to_numpy(v) for v in variables], average)


def test_gc_centralises_each_output_unit_of_a_dense_kernel() -> None:
    """Keras kernels are (fan_in, units): the mean is over axis 0, per output unit."""
    kernel = keras.Variable(np.zeros((5, 3), np.float32))
    grad = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32) + 1.0
    Ranger(learning_rate=1.0).apply([keras.ops.convert_to_tensor(grad)], [kernel])
    step = -to_numpy(kernel)  # step 1 is lr * g_centralised
    np.testing.assert_allclose(step, grad - grad.mean(axis=0), atol=1e-6)
    assert np.abs(step.sum(axis=1)).max() > 1e-2  # not per input row


def test_invalid_arguments_are_refused_with_their_name() -> None:
    for kwargs, word in [
        ({"threshold": 3.0}, "threshold"),
        ({"k": 0}, "k"),
        ({"alpha": 0.0}, "alpha"),
        ({"beta_2": 1.0}, "beta_2"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ]:
        with pytest.raises(ValueError, match=word):
            Ranger(**kwargs)
    with pytest.raises(ValueError, match="use_ema"):
        Lookahead(keras.optimizers.AdamW(use_ema=True))
    with pytest.raises(ValueError, match=r"clipnorm.*inner optimizer"):
        Lookahead(keras.optimizers.AdamW(), clipnorm=1.0)
    with pytest.raises(TypeError, match=r"keras\.optimizers\.Optimizer"):
        Lookahead("adamw")


def test_importing_rangerdl_does_not_import_keras() -> None:
    code = (
        "import sys, rangerdl, rangerdl.optim; "
        "bad = [m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules]; "
        "assert not bad, bad; import rangerdl.keras; assert 'keras' in sys.modules"
    )
    # The bound only keeps a hung import from hanging the suite. `make test` runs this file at
    # nice 19 beside the main suite, where importing TensorFlow can wait minutes for a CPU.
    subprocess.run([sys.executable, "-c", code], check=True, timeout=900)
