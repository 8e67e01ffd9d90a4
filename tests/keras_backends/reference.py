"""The test problem in both layouts, and the PyTorch references the Keras optimizers must equal.

A Dense-like kernel, a bias and a conv kernel, in Keras layout (output axis last) and in torch
layout (output axis first). Gradients depend on the weights and come from torch autograd on the
torch layout for both sides, so the two optimizers see the same function of their own weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import torch

# keras shape, and the permutation that takes a keras array to the torch layout
KERAS_SHAPES: list[tuple[int, ...]] = [(5, 7), (7,), (3, 3, 2, 4)]
TO_TORCH: list[tuple[int, ...]] = [(1, 0), (0,), (3, 2, 0, 1)]
TO_KERAS: list[tuple[int, ...]] = [tuple(np.argsort(p)) for p in TO_TORCH]


def to_numpy(variable: Any) -> np.ndarray:
    """A Keras variable's value as a numpy array. ``keras.ops.convert_to_numpy(variable)`` goes
    through ``Variable.__array__``, which lacks numpy 2's ``copy`` argument (a DeprecationWarning
    per call on the JAX and TensorFlow backends); the backend tensor behind it converts cleanly
    (torch: detached; TensorFlow: its own ``numpy()``)."""
    value = variable.value
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    elif hasattr(value, "numpy"):
        return np.array(value.numpy())
    return np.array(np.asarray(value))


def initial_keras_arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in KERAS_SHAPES]


def to_torch(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(a.transpose(p)) for a, p in zip(arrays, TO_TORCH, strict=True)]


def to_keras(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(a.transpose(p)) for a, p in zip(arrays, TO_KERAS, strict=True)]


def torch_loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """Non-quadratic, with row means that GC removes; the data changes with the step."""
    gen = torch.Generator().manual_seed(1000 + step % 3)
    x = torch.randn(16, 5, generator=gen)
    target = torch.randn(16, 7, generator=gen)
    w, b, kernel = params  # (7, 5), (7,), (4, 2, 3, 3)
    loss = ((torch.tanh(x @ w.T + b) - target) ** 2).mean() + 0.05 * (w**4).mean()
    return loss + 0.1 * (kernel.sin() * kernel).sum() + 0.3 * kernel.sum() * (step % 2)


def keras_grads(keras_arrays: list[np.ndarray], step: int) -> list[np.ndarray]:
    """The gradient of ``torch_loss`` at Keras-layout weights, in Keras layout."""
    params = [torch.tensor(a, requires_grad=True) for a in to_torch(keras_arrays)]
    torch_loss(params, step).backward()
    return to_keras([p.grad.numpy() for p in params])


def compiled_apply(optimizer: Any, variables: list[Any]) -> Callable[[list[Any]], None]:
    """``optimizer.apply(grads, variables)`` compiled the way ``fit`` compiles a train step.

    TensorFlow: a ``tf.function`` graph; JAX: ``jax.jit`` over ``stateless_apply``; PyTorch: eager
    (what ``fit`` runs by default there).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        optimizer.build(variables)
        return tf.function(lambda grads: optimizer.apply(grads, variables))
    if backend == "jax":
        import jax

        optimizer.build(variables)
        step = jax.jit(optimizer.stateless_apply)

        def apply(grads: list[Any]) -> None:
            new_vars, new_opt = step(
                [v.value for v in optimizer.variables], grads, [v.value for v in variables]
            )
            for var, value in zip(variables, new_vars, strict=True):
                var.assign(value)
            for var, value in zip(optimizer.variables, new_opt, strict=True):
                var.assign(value)

        return apply
    return lambda grads: optimizer.apply(grads, variables)


def keras_trajectory(
    optimizer: Any,
    steps: int,
    *,
    seed: int = 0,
    compiled: bool = True,
    grad_fn: Callable[..., Any] = keras_grads,
) -> np.ndarray:
    """Flattened Keras-layout weights after every step, shape (steps, values)."""
    variables = [keras.Variable(a) for a in initial_keras_arrays(seed)]
    if compiled:
        apply = compiled_apply(optimizer, variables)
    else:

        def apply(grads: list[Any]) -> None:
            optimizer.apply(grads, variables)

    out = []
    for t in range(steps):
        grads = grad_fn([to_numpy(v) for v in variables], t)
        apply([keras.ops.convert_to_tensor(g) for g in grads])
        out.append(np.concatenate([to_numpy(v).ravel() for v in variables]))
    return np.stack(out)


def torch_trajectory(
    make: Callable[[list[torch.nn.Parameter]], Any],
    steps: int,
    *,
    seed: int = 0,
    lr_at: Callable[[int], float] | None = None,
) -> np.ndarray:
    """The same for a torch optimizer on torch-layout parameters, recorded in Keras layout."""
    params = [torch.nn.Parameter(torch.tensor(a)) for a in to_torch(initial_keras_arrays(seed))]
    opt = make(params)
    out = []
    for t in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(t)
        opt.zero_grad()
        torch_loss(params, t).backward()
        opt.step()
        arrays = to_keras([p.detach().numpy().copy() for p in params])
        out.append(np.concatenate([a.ravel() for a in arrays]))
    return np.stack(out)
