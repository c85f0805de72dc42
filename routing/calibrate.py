"""Threshold calibration (after RouteLLM): turn a cloud share rho into the PRS threshold alpha
on a recent sample of predictions. The budget keeper stays the hard guarantee; this only makes
the router ask for the cloud about as often as the budget allows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _allowed_count(n: int, rho: float) -> int:
    """The largest k with k / n <= rho, computed the way the share is checked."""
    k = min(n, math.floor(rho * n))
    while k < n and (k + 1) / n <= rho:
        k += 1
    while k > 0 and k / n > rho:
        k -= 1
    return k


def calibrate_alpha(
    predicted_prs: np.ndarray | Sequence[float], rho: float, max_alpha: float = 0.5
) -> float:
    """The largest alpha <= max_alpha whose cloud share, mean(predicted_prs < alpha), is <= rho.

    Ties are safe: the threshold is a predicted value itself and routing uses a strict ``<``,
    so a block of equal predictions goes to the cloud all together or not at all. rho = 0
    gives alpha = 0 (nothing routed, PRS is never negative); an empty sample gives 0 too unless
    rho = 1, failing cheap until there are predictions to calibrate on.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f"max_alpha must lie in [0, 1], got {max_alpha}")
    values = np.sort(np.asarray(predicted_prs, dtype=np.float64).ravel())
    if not np.all(np.isfinite(values)):
        raise ValueError("predicted PRS holds non-finite values")
    if rho >= 1.0:
        return float(max_alpha)
    if rho == 0.0 or values.size == 0:
        return 0.0
    k = _allowed_count(values.size, rho)
    if k >= values.size:
        return float(max_alpha)
    # Fewer than k + 1 predictions lie strictly below the (k+1)-th smallest one.
    return float(min(values[k], max_alpha))


def route_to_cloud(prs: np.ndarray, alpha: float) -> np.ndarray:
    """The policy (RouteT2I, Sec. 3.4): cloud when predicted PRS < alpha."""
    decision: np.ndarray = np.asarray(prs, dtype=np.float64) < alpha
    return decision
