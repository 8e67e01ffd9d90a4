"""RAdam's variance rectification, in plain Python (no torch): shared by ``rangerdl.optim.Ranger``
and ``rangerdl.keras.Ranger`` (which must not import torch).

Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond" (ICLR 2020), eq. (6)-(8).
"""

from __future__ import annotations

import math

__all__ = ["rectification"]


def rectification(step: int, beta2: float, threshold: float) -> float | None:
    """The RAdam variance rectification ``r_t`` at ``step``, or ``None`` while ``rho_t <= threshold``.

    ``None`` means the step is an SGD step with bias-corrected momentum (steps 1-5 for any
    ``beta2`` in [0.9, 0.9999] with the default threshold 5).
    """
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**step
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    if rho_t <= threshold:
        return None
    return math.sqrt(
        (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
    )
