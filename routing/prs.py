"""Normalised distance and Pareto relative superiority (RouteT2I, Sec. 3.1): the labels a router
learns. Both depend on per-tier means over the training set, so they are recomputed from the raw
metric vectors whenever a router is trained, never stored as ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from routing.types import PairTable

# |mu_e - mu_c| is floored here: a metric on which both tiers have the same mean would otherwise
# divide by zero; the floor turns D_i into a near step function of the sign of q_e - q_c.
MIN_MEAN_GAP = 1e-6
WEIGHT_TOLERANCE = 1e-6


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings (tanh form), exact symmetry s(-x) = 1 - s(x)
    up to rounding."""
    result: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))
    return result


def tier_means(edge: np.ndarray, cloud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-metric means mu_i of each tier over the rows: shapes (m,), (m,)."""
    edge, cloud = np.atleast_2d(edge), np.atleast_2d(cloud)
    if edge.shape != cloud.shape or edge.shape[0] == 0:
        raise ValueError(f"need two non-empty tables of one shape, got {edge.shape}, {cloud.shape}")
    mu_edge: np.ndarray = edge.mean(axis=0)
    mu_cloud: np.ndarray = cloud.mean(axis=0)
    return mu_edge, mu_cloud


def normalised_distance(
    q_edge: np.ndarray,
    q_cloud: np.ndarray,
    mu_edge: np.ndarray,
    mu_cloud: np.ndarray,
    gamma: float,
) -> np.ndarray:
    """D_i = sigmoid((q_e,i - q_c,i) / (gamma * |mu_e,i - mu_c,i|)), shape of ``q_edge``.

    D_i > 0.5 means the edge image is better on metric i, by a margin measured in units of the
    typical gap between the tiers. It lies in (0, 1); in floating point it reaches 0 or 1 only
    for differences of more than about 36 such units.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    gap = np.maximum(np.abs(np.asarray(mu_edge) - np.asarray(mu_cloud)), MIN_MEAN_GAP)
    return sigmoid((np.asarray(q_edge) - np.asarray(q_cloud)) / (gamma * gap))


def check_weights(weights: np.ndarray | tuple[float, ...], n_metrics: int) -> np.ndarray:
    """Weights as an array, after checking they are m non-negative numbers that sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_metrics,):
        raise ValueError(f"expected {n_metrics} weights, got shape {w.shape}")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and non-negative")
    if abs(w.sum() - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"weights must sum to 1, they sum to {w.sum()}")
    return w


def prs(distance: np.ndarray, weights: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """Pareto relative superiority sum_i w_i D_i, one value per row of ``distance`` (n, m)."""
    d = np.atleast_2d(distance)
    # Weights that sum to one only up to rounding could push a sum of ones just past 1.
    result: np.ndarray = np.clip(d @ check_weights(weights, d.shape[1]), 0.0, 1.0)
    return result


def uniform_weights(n_metrics: int) -> tuple[float, ...]:
    return tuple(1.0 / n_metrics for _ in range(n_metrics))


@dataclass(frozen=True)
class PRSParams:
    """What turns raw metric vectors into labels: the training-set tier means, Gamma, weights."""

    mu_edge: tuple[float, ...]
    mu_cloud: tuple[float, ...]
    gamma: float
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mu_edge) != len(self.mu_cloud):
            raise ValueError("mu_edge and mu_cloud differ in length")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        check_weights(self.weights, len(self.mu_edge))

    @property
    def n_metrics(self) -> int:
        return len(self.mu_edge)

    @classmethod
    def fit(
        cls, table: PairTable, gamma: float = 1.0, weights: tuple[float, ...] | None = None
    ) -> Self:
        """Parameters from a training split; equal weights unless given."""
        mu_edge, mu_cloud = tier_means(table.edge, table.cloud)
        return cls(
            mu_edge=tuple(float(v) for v in mu_edge),
            mu_cloud=tuple(float(v) for v in mu_cloud),
            gamma=float(gamma),
            weights=tuple(float(w) for w in weights or uniform_weights(len(table.metrics))),
        )

    def distance(self, edge: np.ndarray, cloud: np.ndarray) -> np.ndarray:
        return normalised_distance(
            edge, cloud, np.array(self.mu_edge), np.array(self.mu_cloud), self.gamma
        )

    def labels(self, table: PairTable) -> tuple[np.ndarray, np.ndarray]:
        """D (n, m) and PRS (n,) of a table under these parameters."""
        if len(table.metrics) != self.n_metrics:
            raise ValueError(f"table has {len(table.metrics)} metrics, params {self.n_metrics}")
        distance = self.distance(table.edge, table.cloud)
        return distance, prs(distance, self.weights)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mu_edge": list(self.mu_edge),
            "mu_cloud": list(self.mu_cloud),
            "gamma": self.gamma,
            "weights": list(self.weights),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(
            mu_edge=tuple(float(v) for v in data["mu_edge"]),
            mu_cloud=tuple(float(v) for v in data["mu_cloud"]),
            gamma=float(data["gamma"]),
            weights=tuple(float(w) for w in data["weights"]),
        )
