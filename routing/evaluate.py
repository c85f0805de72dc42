"""The routing harness: cross-validate routers on edge/cloud pair tables and measure the quality
of the routed mix as the cloud share grows (after RouteLLM's evaluation, Ong et al., arXiv
2406.18665, Sec. 5, and the RouteT2I paper's Delta P, Niu et al., arXiv 2411.13787, Sec. 4).

A router ranks the test prompts by predicted PRS; at cloud share p the lowest p*n go to the
cloud. ``recovered`` is the share of the cloud's gain over edge-only that the mix recovers
(RouteLLM's PGR); its mean over p in [0, 1] is the APGR, and Delta P@50% is its value at p = 1/2.
Every number is measured on a test fold that the router never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from routing.data import scalar_quality
from routing.encodings import SharedEncoding
from routing.registry import PAIR_ROUTERS, BuildContext, build_router
from routing.types import PairTable, Router

if TYPE_CHECKING:
    from routing.routet2i import RouteT2IConfig

SHARES: np.ndarray = np.round(np.linspace(0.0, 1.0, 21), 2)
GAIN_TARGETS: tuple[float, ...] = (0.4, 0.5, 0.6)
# A fold whose cloud-only gain over edge-only is below this (in quality units) cannot be
# normalised: the recovered share would divide by nearly zero. Its normalised scores are NaN.
MIN_FOLD_GAIN = 1e-9


def cumulative_gain(prs: np.ndarray, gain: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Total cloud gain of sending the ``counts`` prompts with the lowest predicted PRS.

    Prompts with equal predictions cannot be told apart, so a count that cuts a block of ties
    gets the block's expected gain under a random order: the cumulative gain is linear inside
    each block. Fractional counts interpolate the same way (a randomised last decision).
    """
    prs, gain = np.asarray(prs, dtype=np.float64), np.asarray(gain, dtype=np.float64)
    if prs.shape != gain.shape or prs.ndim != 1:
        raise ValueError(f"prs {prs.shape} and gain {gain.shape} must be equal 1-d shapes")
    if not np.all(np.isfinite(prs)):
        raise ValueError("predicted PRS holds non-finite values")
    order = np.argsort(prs, kind="stable")
    sorted_prs, sorted_gain = prs[order], gain[order]
    block_end = np.flatnonzero(np.append(sorted_prs[1:] != sorted_prs[:-1], True)) + 1
    knots = np.concatenate(([0], block_end))
    at_knots = np.concatenate(([0.0], np.cumsum(sorted_gain)[block_end - 1]))
    result: np.ndarray = np.interp(np.asarray(counts, dtype=np.float64), knots, at_knots)
    return result


@dataclass(frozen=True)
class FoldScore:
    """One router on one test fold. ``quality`` is the routed mix's mean quality on ``shares``;
    the normalised numbers are NaN when the fold has no cloud gain to recover."""

    experiment: str
    router: str
    seed: int
    fold: int
    edge_quality: float
    cloud_quality: float
    quality: np.ndarray
    recovered: np.ndarray
    apgr: float
    delta_p50: float
    share_at: dict[float, float]


def score_routing(
    prs: np.ndarray,
    edge_quality: np.ndarray,
    cloud_quality: np.ndarray,
    shares: np.ndarray = SHARES,
    targets: Sequence[float] = GAIN_TARGETS,
) -> tuple[np.ndarray, np.ndarray, float, float, dict[float, float]]:
    """(quality curve, recovered-gain curve, APGR, Delta P@50% in percent, smallest share per
    target) of one ranking on one test set. ``shares`` must run from 0 to 1 and include 1/2."""
    shares = np.asarray(shares, dtype=np.float64)
    if shares[0] != 0.0 or shares[-1] != 1.0 or not np.any(np.isclose(shares, 0.5)):
        raise ValueError("shares must start at 0, end at 1 and include 0.5")
    n = len(prs)
    gain = np.asarray(cloud_quality, dtype=np.float64) - np.asarray(edge_quality, dtype=np.float64)
    base, total = float(np.mean(edge_quality)), float(gain.sum())
    quality = base + cumulative_gain(prs, gain, shares * n) / n
    if total < MIN_FOLD_GAIN:
        nan = float("nan")
        return quality, np.full_like(shares, nan), nan, nan, dict.fromkeys(targets, nan)
    recovered = cumulative_gain(prs, gain, shares * n) / total
    apgr = float(np.trapezoid(recovered, shares))
    delta_p50 = 100.0 * float(np.interp(0.5, shares, recovered))
    every_count = cumulative_gain(prs, gain, np.arange(n + 1)) / total
    share_at = {t: float(np.argmax(every_count >= t - 1e-12)) / n for t in targets}
    return quality, recovered, apgr, delta_p50, share_at


def kfold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Test indices of ``folds`` disjoint folds covering 0..n-1, shuffled by ``seed``. The split
    depends only on (n, folds, seed), so every pair of one data file shares it."""
    if folds < 2 or folds > n:
        raise ValueError(f"need 2 <= folds <= n, got folds={folds}, n={n}")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


@dataclass(frozen=True)
class Experiment:
    """Train on ``train``, test on ``test``: the same prompts in the same order, possibly the
    ratings of another model pair (a cross-pair run). Folds split the prompts, so a test prompt
    is never among the training prompts, whichever pair it is labelled with."""

    name: str
    train: PairTable
    test: PairTable

    def __post_init__(self) -> None:
        if self.train.prompts != self.test.prompts:
            raise ValueError(f"{self.name}: train and test tables must hold the same prompts")

    @classmethod
    def same_pair(cls, name: str, table: PairTable) -> Experiment:
        return cls(name, table, table)


@dataclass(frozen=True)
class FoldContext:
    """What a router factory may use: the seed for its own randomness and, for the oracle
    alone, the labelled test table."""

    seed: int
    fold: int
    test: PairTable


RouterFactory = Callable[[FoldContext], Router]
ProgressHook = Callable[[str], None]


def cross_validate(
    experiments: Sequence[Experiment],
    routers: Mapping[str, RouterFactory],
    *,
    folds: int = 5,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    shares: np.ndarray = SHARES,
    targets: Sequence[float] = GAIN_TARGETS,
    on_step: ProgressHook | None = None,
) -> list[FoldScore]:
    """Every router fitted on the training folds and scored on the held-out fold, for every
    experiment, seed and fold. ``on_step`` is called after each fit with a description."""
    scores = []
    for experiment in experiments:
        n = len(experiment.test)
        test_edge, test_cloud = scalar_quality(experiment.test)
        for seed in seeds:
            for fold, test_idx in enumerate(kfold_indices(n, folds, seed)):
                train_idx = np.setdiff1d(np.arange(n), test_idx)
                train = experiment.train.take(train_idx)
                prompts = [experiment.test.prompts[i] for i in test_idx]
                context = FoldContext(seed=seed * 1000 + fold, fold=fold, test=experiment.test)
                for name, factory in routers.items():
                    router = factory(context)
                    router.fit(train)
                    prs = np.asarray(router.predict_prs(prompts), dtype=np.float64)
                    if prs.shape != (len(prompts),):
                        raise ValueError(f"{name} returned shape {prs.shape} for {len(prompts)}")
                    curve, recovered, apgr, dp50, share_at = score_routing(
                        prs, test_edge[test_idx], test_cloud[test_idx], shares, targets
                    )
                    scores.append(
                        FoldScore(
                            experiment=experiment.name,
                            router=name,
                            seed=seed,
                            fold=fold,
                            edge_quality=float(test_edge[test_idx].mean()),
                            cloud_quality=float(test_cloud[test_idx].mean()),
                            quality=curve,
                            recovered=recovered,
                            apgr=apgr,
                            delta_p50=dp50,
                            share_at=share_at,
                        )
                    )
                    if on_step is not None:
                        on_step(f"{experiment.name} seed {seed} fold {fold} {name}")
    return scores


@dataclass(frozen=True)
class Summary:
    """Mean and standard deviation over the (seed, fold) runs of one router on one experiment.
    ``valid`` counts the runs whose fold had a cloud gain to normalise by."""

    experiment: str
    router: str
    runs: int
    valid: int
    apgr: tuple[float, float]
    delta_p50: tuple[float, float]
    share_at: dict[float, tuple[float, float]]
    edge_quality: float
    cloud_quality: float
    quality: np.ndarray
    recovered: np.ndarray = field(repr=False)


def _mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def summarise(scores: Sequence[FoldScore]) -> list[Summary]:
    """One summary per (experiment, router), in the order they first appear in ``scores``."""
    groups: dict[tuple[str, str], list[FoldScore]] = {}
    for score in scores:
        groups.setdefault((score.experiment, score.router), []).append(score)
    summaries = []
    for (experiment, router), runs in groups.items():
        valid = [r for r in runs if np.isfinite(r.apgr)]
        targets = list(runs[0].share_at)
        summaries.append(
            Summary(
                experiment=experiment,
                router=router,
                runs=len(runs),
                valid=len(valid),
                apgr=_mean_std([r.apgr for r in runs]),
                delta_p50=_mean_std([r.delta_p50 for r in runs]),
                share_at={t: _mean_std([r.share_at[t] for r in runs]) for t in targets},
                edge_quality=float(np.mean([r.edge_quality for r in runs])),
                cloud_quality=float(np.mean([r.cloud_quality for r in runs])),
                quality=np.mean([r.quality for r in runs], axis=0),
                recovered=(
                    np.mean([r.recovered for r in valid], axis=0)
                    if valid
                    else np.full_like(runs[0].recovered, np.nan)
                ),
            )
        )
    return summaries


@dataclass(frozen=True)
class PairedDifference:
    """``router`` minus ``against`` on one experiment, fold by fold (both were scored on the same
    test folds, so the fold-to-fold spread that both share cancels).

    Each pair is (mean, standard error). The standard error counts one seed's folds as the
    independent samples: the seeds re-split the same prompts, so they steady the mean but add
    no new prompts, and dividing by the square root of every (seed, fold) run would overstate
    the certainty. ``wins`` is the share of folds where ``router`` has the higher Delta P@50%
    (a tie counts half).
    """

    experiment: str
    router: str
    against: str
    runs: int
    delta_p50: tuple[float, float]
    apgr: tuple[float, float]
    wins: float


def _mean_se(values: np.ndarray, independent: int) -> tuple[float, float]:
    """Mean and standard error, the spread divided by the root of the independent samples."""
    mean, spread = _mean_std(values)
    return mean, spread / np.sqrt(max(independent, 1))


def paired_differences(scores: Sequence[FoldScore], router: str) -> list[PairedDifference]:
    """``router`` against every other router of each experiment it was run on, over the folds
    that both could normalise; in the order the routers first appear in ``scores``."""
    by_run: dict[tuple[str, str], dict[tuple[int, int], FoldScore]] = {}
    for score in scores:
        by_run.setdefault((score.experiment, score.router), {})[(score.seed, score.fold)] = score
    differences = []
    for (experiment, other), runs in by_run.items():
        mine = by_run.get((experiment, router))
        if other == router or mine is None:
            continue
        keys = [k for k in mine if k in runs and np.isfinite(mine[k].apgr + runs[k].apgr)]
        dp = np.array([mine[k].delta_p50 - runs[k].delta_p50 for k in keys])
        apgr = np.array([mine[k].apgr - runs[k].apgr for k in keys])
        folds_per_seed = len(keys) // max(len({seed for seed, _ in keys}), 1)
        differences.append(
            PairedDifference(
                experiment=experiment,
                router=router,
                against=other,
                runs=len(keys),
                delta_p50=_mean_se(dp, folds_per_seed),
                apgr=_mean_se(apgr, folds_per_seed),
                wins=float(np.mean(dp > 0) + 0.5 * np.mean(dp == 0)) if keys else float("nan"),
            )
        )
    return differences


def router_factories(
    names: Sequence[str] = PAIR_ROUTERS,
    shared: SharedEncoding | None = None,
    routet2i_config: RouteT2IConfig | None = None,
) -> dict[str, RouterFactory]:
    """Factories for the named pair routers of ``routing.registry``, built fresh per fold under
    the fold's seed; the learned routers share one ``SharedEncoding``, and RouteT2I is built
    from ``routet2i_config`` (its defaults when None)."""
    unknown = [n for n in names if n not in PAIR_ROUTERS]
    if unknown:
        raise ValueError(f"unknown routers {unknown}; known: {', '.join(PAIR_ROUTERS)}")
    shared = shared if shared is not None else SharedEncoding()

    def factory(name: str) -> RouterFactory:
        def build(c: FoldContext) -> Router:
            context = BuildContext(c.seed, shared, routet2i_config, c.test)
            return build_router(name, context)

        return build

    return {n: factory(n) for n in names}
