"""The per-step scalars of RAdam, for Keras graphs: exact where float32 arithmetic is not.

RAdam's rectification subtracts two numbers near ``rho_inf`` (1999 for ``beta_2 = 0.999``, 19999 for
0.9999); in float32 (all JAX has by default) that loses up to 4e-4 of ``r_t`` in the first steps. So
the step-size factor of the first :data:`TABLE_STEPS` steps is computed here in float64 and put in the
graph as a table; later steps, where float32 is accurate to < 1e-6, use the formula on tensors.
"""

from __future__ import annotations

import math

import numpy as np

from rangerdl.optim._radam_math import rectification

__all__ = ["TABLE_STEPS", "first_rectified_step", "rectification", "step_factors"]

TABLE_STEPS = 1024


def first_rectified_step(beta2: float, threshold: float) -> int | None:
    """The first step with ``rho_t > threshold`` (``rho_t`` grows with t), or ``None`` if never.

    Step 6 for every ``beta2`` in [0.9, 0.9999] with threshold 5.
    """
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    if rho_inf <= threshold:
        return None
    hi = 1
    while rectification(hi, beta2, threshold) is None:
        hi *= 2
    lo = hi // 2  # not rectified (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rectification(mid, beta2, threshold) is None:
            lo = mid
        else:
            hi = mid
    return hi


def step_factors(beta1: float, beta2: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For steps 1..TABLE_STEPS: the factor that multiplies ``lr``, and 1.0 where rectified.

    Rectified: ``r_t sqrt(1 - beta2^t) / (1 - beta1^t)`` (the update is ``factor m / (sqrt(v) +
    eps)``); not rectified: ``1 / (1 - beta1^t)`` (the update is ``factor m``).
    """
    factors = np.empty(TABLE_STEPS, dtype=np.float64)
    rectified = np.zeros(TABLE_STEPS, dtype=np.float64)
    for i in range(TABLE_STEPS):
        step = i + 1
        bias_correction1 = 1.0 - beta1**step
        rect = rectification(step, beta2, threshold)
        if rect is None:
            factors[i] = 1.0 / bias_correction1
        else:
            factors[i] = rect * math.sqrt(1.0 - beta2**step) / bias_correction1
            rectified[i] = 1.0
    return factors.astype(np.float32), rectified.astype(np.float32)
