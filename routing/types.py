"""The shapes every router and the harness share: tables of labelled prompts (a pair of tiers,
or a pool of any number) and the router interfaces (after RouteLLM: a router scores a prompt;
a policy makes the choice).

A router implements one method of its kind: ``predict_prs`` for a pair, ``predict_quality`` for
a pool. Its base class (``PairRouterBase``, ``PoolRouterBase``) turns that into the one method
that serving calls, ``predict_tier_quality``: every tier's score and, where the router predicts
them, RouteT2I's per-metric D_i, from one call."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np

from routing.policy import pair_scores


@dataclass(frozen=True)
class PairTable:
    """Prompts with the quality of the edge and the cloud image on each metric.

    ``edge`` and ``cloud`` have shape (n_prompts, n_metrics); a single-score data set
    (one human rating per image) has n_metrics == 1.
    """

    prompts: tuple[str, ...]
    edge: np.ndarray
    cloud: np.ndarray
    metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        n, m = len(self.prompts), len(self.metrics)
        for name, arr in (("edge", self.edge), ("cloud", self.cloud)):
            if arr.shape != (n, m):
                raise ValueError(f"{name} has shape {arr.shape}, expected {(n, m)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} holds non-finite values")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def single_score(self) -> bool:
        return len(self.metrics) == 1

    def take(self, index: Sequence[int] | np.ndarray) -> PairTable:
        idx = np.asarray(index, dtype=np.int64)
        return PairTable(
            prompts=tuple(self.prompts[i] for i in idx),
            edge=self.edge[idx],
            cloud=self.cloud[idx],
            metrics=self.metrics,
        )

    def pool(self) -> PoolTable:
        """The same table as a two-tier pool ("edge", "cloud"); edge is the reference."""
        return PoolTable(
            prompts=self.prompts,
            quality=np.stack([self.edge, self.cloud], axis=1),
            tiers=PAIR_TIERS,
            metrics=self.metrics,
        )


PAIR_TIERS = ("edge", "cloud")


@dataclass(frozen=True)
class PoolTable:
    """Prompts with the quality of every tier's image on each metric.

    ``quality`` has shape (n_prompts, n_tiers, n_metrics). Tier 0 is the reference tier (the
    cheapest of the pool, the edge of a pair) against which RouteT2I measures superiority. A
    ``PairTable`` is the two-tier case (``PairTable.pool``, ``PoolTable.pair``).
    """

    prompts: tuple[str, ...]
    quality: np.ndarray
    tiers: tuple[str, ...]
    metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        shape = (len(self.prompts), len(self.tiers), len(self.metrics))
        if self.quality.shape != shape:
            raise ValueError(f"quality has shape {self.quality.shape}, expected {shape}")
        if len(self.tiers) < 2 or len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"a pool needs two or more distinct tiers, got {self.tiers}")
        if not np.all(np.isfinite(self.quality)):
            raise ValueError("quality holds non-finite values")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index: Sequence[int] | np.ndarray) -> PoolTable:
        idx = np.asarray(index, dtype=np.int64)
        return PoolTable(
            prompts=tuple(self.prompts[i] for i in idx),
            quality=self.quality[idx],
            tiers=self.tiers,
            metrics=self.metrics,
        )

    def tier_index(self, tier: str) -> int:
        try:
            return self.tiers.index(tier)
        except ValueError:
            raise ValueError(f"unknown tier {tier!r}; known: {', '.join(self.tiers)}") from None

    def pair(self, edge: str, cloud: str) -> PairTable:
        """Two tiers of the pool as an edge/cloud pair table."""
        if edge == cloud:
            raise ValueError(f"edge and cloud are the same tier {edge!r}")
        return PairTable(
            prompts=self.prompts,
            edge=self.quality[:, self.tier_index(edge)],
            cloud=self.quality[:, self.tier_index(cloud)],
            metrics=self.metrics,
        )

    def select(self, tiers: Sequence[str]) -> PoolTable:
        """A sub-pool of the named tiers, in the given order (the first is the reference)."""
        idx = [self.tier_index(t) for t in tiers]
        return PoolTable(self.prompts, self.quality[:, idx], tuple(tiers), self.metrics)


def as_pool(table: PairTable | PoolTable) -> PoolTable:
    return table.pool() if isinstance(table, PairTable) else table


@runtime_checkable
class PoolRouter(Protocol):
    """Predicts, per prompt and before any image exists, a score for every tier of the pool in
    one batched call: higher is better, in units comparable across tiers (a quality estimate,
    or a superiority against the reference tier). The policy (``routing.policy``) trades it
    against cost; the columns follow the ``tiers`` of the table the router was fitted on.
    """

    @property
    def name(self) -> str: ...

    def fit(self, train: PoolTable) -> None: ...

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class Router(Protocol):
    """Predicts, per prompt and before any image exists, the Pareto relative superiority
    of the edge image over the cloud image: PRS > 0.5 edge better, PRS < 0.5 cloud better.
    Only the order of the predictions matters to the policy; calibration picks the threshold.
    """

    @property
    def name(self) -> str: ...

    def fit(self, train: PairTable) -> None: ...

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class PersistentRouter(Router, Protocol):
    """A router that can be saved to a directory and loaded back by ``routing.registry``."""

    @property
    def kind(self) -> str: ...

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Self: ...


@runtime_checkable
class PersistentPoolRouter(PoolRouter, Protocol):
    """A pool router that can be saved to a directory and loaded back by ``routing.registry``."""

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Self: ...


@dataclass(frozen=True)
class TierQuality:
    """Every tier's score per prompt (prompts, tiers), columns in the order of ``tiers``, higher
    is better; and the per-metric D_i (prompts, metrics) where the router predicts them."""

    tiers: tuple[str, ...]
    quality: np.ndarray
    metrics: np.ndarray | None = None


@runtime_checkable
class TierScorer(Protocol):
    """What serving calls: every tier's score for a batch of prompts, given the pool's tiers
    (cheapest first)."""

    def predict_tier_quality(self, prompts: Sequence[str], tiers: Sequence[str]) -> TierQuality: ...


class PairRouterBase(abc.ABC):
    """The base of the pair routers: implement ``predict_prs``; the base class scores every
    tier of a pool from it (``routing.policy.pair_scores``)."""

    @abc.abstractmethod
    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray: ...

    def predict_tier_quality(self, prompts: Sequence[str], tiers: Sequence[str]) -> TierQuality:
        return TierQuality(tuple(tiers), pair_scores(self.predict_prs(prompts), len(tiers)))


class PoolRouterBase(abc.ABC):
    """The base of the pool routers: implement ``predict_quality``, whose columns are the tiers
    the router was fitted on (its ``tiers``; those of the pool asked for when it records none:
    the evaluation-only random and oracle routers)."""

    @abc.abstractmethod
    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray: ...

    def predict_tier_quality(self, prompts: Sequence[str], tiers: Sequence[str]) -> TierQuality:
        own: tuple[str, ...] = getattr(self, "tiers", tuple(tiers))
        return TierQuality(own, self.predict_quality(prompts))
