"""The pool harness: cross-validate pool routers and measure, for every budget, the mean quality
of the routed mix against its mean cost per request, beside every single model and the upper
frontier (concave hull) of single models, which is what mixing single models at random reaches.

Protocol as in ``routing.evaluate``: k folds over seeds, each router built fresh per fold,
trained on the other folds, asked about the held-out prompts only. At a mean-cost budget the
policy of ``routing.policy`` chooses per prompt, lambda calibrated on the test fold's own
predictions (no labels), as the pair harness ranks a fold's own predictions at a cloud share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from routing.data import pool_scalar_quality
from routing.encodings import SharedEncoding
from routing.evaluate import _mean_std, kfold_indices
from routing.policy import check_costs, routed_mix
from routing.registry import POOL_ROUTERS, BuildContext, build_pool_router
from routing.types import PoolRouter, PoolTable

if TYPE_CHECKING:
    from routing.routet2i import RouteT2IConfig

GRID_POINTS = 81


@dataclass(frozen=True)
class PoolExperiment:
    """A pool of tiers with a cost per tier (same order as ``table.tiers``)."""

    name: str
    table: PoolTable
    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        check_costs(self.costs, len(self.table.tiers))


def budget_grid(
    costs: Sequence[float], extra: Sequence[float] = (), points: int = GRID_POINTS
) -> np.ndarray:
    """Mean-cost budgets from the cheapest to the dearest tier, every tier's cost and the
    ``extra`` budgets included exactly."""
    low, high = min(costs), max(costs)
    inside = [b for b in extra if low <= b <= high]
    return np.unique(np.concatenate([np.linspace(low, high, points), costs, inside]))


def single_frontier(costs: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (cost, quality) of the upper concave hull of single models, cheapest first,
    kept only while quality rises: the best a random mix of single models reaches per cost."""
    order = np.lexsort((-quality, costs))
    hull: list[tuple[float, float]] = []
    for c, q in zip(costs[order], quality[order], strict=True):
        if hull and (c == hull[-1][0] or q <= hull[-1][1]):
            continue
        while len(hull) >= 2:
            (c1, q1), (c2, q2) = hull[-2], hull[-1]
            if (q2 - q1) * (c - c1) <= (q - q1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append((float(c), float(q)))
    points = np.array(hull)
    return points[:, 0], points[:, 1]


def frontier_quality(costs: np.ndarray, quality: np.ndarray, budget: float) -> float:
    """Quality of the single-model frontier at a mean-cost budget (flat past its dearest
    vertex, the cheapest model's quality below its cost)."""
    c, q = single_frontier(costs, quality)
    return float(np.interp(budget, c, q))


def cost_to_reach(cost: np.ndarray, quality: np.ndarray, target: float) -> float:
    """The lowest mean cost on a (cost, quality) curve whose quality reaches ``target``,
    linear between grid points; NaN when it never does."""
    above = np.flatnonzero(quality >= target - 1e-12)
    if above.size == 0:
        return float("nan")
    i = int(above[0])
    if i == 0 or quality[i] == quality[i - 1]:
        return float(cost[i])
    share = (target - quality[i - 1]) / (quality[i] - quality[i - 1])
    return float(cost[i - 1] + share * (cost[i] - cost[i - 1]))


@dataclass(frozen=True)
class PoolFoldContext:
    """What a pool-router factory may use: its seed and, for the oracle alone, the test table."""

    seed: int
    fold: int
    test: PoolTable


PoolRouterFactory = Callable[[PoolFoldContext], PoolRouter]


@dataclass(frozen=True)
class PoolFoldScore:
    """One router on one test fold: mean cost and quality at every budget of ``budgets``, and
    each single model's mean quality on the fold."""

    experiment: str
    router: str
    seed: int
    fold: int
    budgets: np.ndarray
    cost: np.ndarray
    quality: np.ndarray
    single: np.ndarray


def cross_validate_pool(
    experiments: Sequence[PoolExperiment],
    routers: Mapping[str, PoolRouterFactory],
    *,
    folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    extra_budgets: Sequence[float] = (),
    on_step: Callable[[str], None] | None = None,
) -> list[PoolFoldScore]:
    scores = []
    for experiment in experiments:
        table, costs = experiment.table, np.asarray(experiment.costs, dtype=np.float64)
        quality = pool_scalar_quality(table)
        budgets = budget_grid(experiment.costs, extra_budgets)
        n = len(table)
        for seed in seeds:
            for fold, test_idx in enumerate(kfold_indices(n, folds, seed)):
                train = table.take(np.setdiff1d(np.arange(n), test_idx))
                prompts = [table.prompts[i] for i in test_idx]
                context = PoolFoldContext(seed=seed * 1000 + fold, fold=fold, test=table)
                truth = quality[test_idx]
                for name, factory in routers.items():
                    router = factory(context)
                    router.fit(train)
                    predicted = np.asarray(router.predict_quality(prompts), dtype=np.float64)
                    if predicted.shape != truth.shape:
                        raise ValueError(f"{name} returned {predicted.shape}, not {truth.shape}")
                    mix = np.array([routed_mix(predicted, truth, costs, b) for b in budgets])
                    scores.append(
                        PoolFoldScore(
                            experiment=experiment.name,
                            router=name,
                            seed=seed,
                            fold=fold,
                            budgets=budgets,
                            cost=mix[:, 0],
                            quality=mix[:, 1],
                            single=truth.mean(axis=0),
                        )
                    )
                    if on_step is not None:
                        on_step(f"{experiment.name} seed {seed} fold {fold} {name}")
    return scores


@dataclass(frozen=True)
class PoolSummary:
    """One router on one pool, over every (seed, fold): the mean curve and the headlines.

    ``at_reference`` is the quality at the cost of the best single model (the reference, the
    single model of highest mean quality); ``match_cost`` the lowest mean cost at which the
    mean curve reaches the reference's quality (NaN: never); ``at_budget`` the quality at each
    extra budget; ``best`` the (cost, quality) of lambda = 0, the router's own best choice.
    """

    experiment: str
    router: str
    runs: int
    budgets: np.ndarray
    cost: np.ndarray
    quality: np.ndarray
    at_reference: tuple[float, float]
    match_cost: float
    at_budget: dict[float, tuple[float, float]]
    best: tuple[float, float]


@dataclass(frozen=True)
class PoolReference:
    """The single models of one pool: costs, mean qualities, the best one and the frontier."""

    experiment: str
    tiers: tuple[str, ...]
    costs: np.ndarray
    quality: np.ndarray

    @property
    def best(self) -> int:
        return int(np.argmax(self.quality))

    def frontier(self, budget: float) -> float:
        return frontier_quality(self.costs, self.quality, budget)


def pool_references(
    experiments: Sequence[PoolExperiment], scores: Sequence[PoolFoldScore]
) -> dict[str, PoolReference]:
    references = {}
    for e in experiments:
        single = [s.single for s in scores if s.experiment == e.name]
        references[e.name] = PoolReference(
            e.name, e.table.tiers, np.asarray(e.costs), np.mean(single, axis=0)
        )
    return references


def summarise_pool(
    scores: Sequence[PoolFoldScore],
    references: Mapping[str, PoolReference],
    extra_budgets: Sequence[float] = (),
) -> list[PoolSummary]:
    groups: dict[tuple[str, str], list[PoolFoldScore]] = {}
    for score in scores:
        groups.setdefault((score.experiment, score.router), []).append(score)
    summaries = []
    for (experiment, router), runs in groups.items():
        ref = references[experiment]
        budgets = runs[0].budgets
        at = {
            b: int(np.flatnonzero(np.isclose(budgets, b))[0])
            for b in extra_budgets
            if np.any(np.isclose(budgets, b))
        }
        reference_at = int(np.flatnonzero(np.isclose(budgets, ref.costs[ref.best]))[0])
        cost = np.mean([r.cost for r in runs], axis=0)
        quality = np.mean([r.quality for r in runs], axis=0)
        summaries.append(
            PoolSummary(
                experiment=experiment,
                router=router,
                runs=len(runs),
                budgets=budgets,
                cost=cost,
                quality=quality,
                at_reference=_mean_std([r.quality[reference_at] for r in runs]),
                match_cost=cost_to_reach(cost, quality, float(ref.quality[ref.best])),
                at_budget={b: _mean_std([r.quality[i] for r in runs]) for b, i in at.items()},
                best=(float(cost[-1]), float(quality[-1])),
            )
        )
    return summaries


def pool_router_factories(
    names: Sequence[str] = POOL_ROUTERS,
    shared: SharedEncoding | None = None,
    routet2i_config: RouteT2IConfig | None = None,
) -> dict[str, PoolRouterFactory]:
    """Factories for the named pool routers of ``routing.registry``, built fresh per fold;
    the embedding routers share one encoding."""
    unknown = [n for n in names if n not in POOL_ROUTERS]
    if unknown:
        raise ValueError(f"unknown pool routers {unknown}; known: {', '.join(POOL_ROUTERS)}")
    enc = shared if shared is not None else SharedEncoding()

    def factory(name: str) -> PoolRouterFactory:
        def build(c: PoolFoldContext) -> PoolRouter:
            return build_pool_router(name, BuildContext(c.seed, enc, routet2i_config, c.test))

        return build

    return {n: factory(n) for n in names}
