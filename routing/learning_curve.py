"""Sample efficiency: how many labelled prompts a router needs before it routes better than the
cold-start policy (issue 12, section 2), the evidence behind the cold-start policy and the
retraining threshold ``retrain_min_pairs``.

For every training-set size n and seed, n prompts are drawn at random and every router is
trained on them; all the other prompts are its test set. The draws of one seed are nested (the
first n of one permutation), so one seed's curve is one growing set of labels, as a live system
collects them; every router of a (seed, n) sees the same split, so routers are compared paired.
A pair is scored by held-out APGR (``routing.evaluate.score_routing``); a pool by its quality at
cost: the mean true quality of the routed mix (``routing.policy.routed_mix``, lambda calibrated
on the test predictions) averaged over the budget grid of ``routing.pool_evaluate.budget_grid``,
every mean cost from the cheapest tier's to the dearest's. That mean is the pool's counterpart
of APGR, which averages over every cloud share.

A router beats a reference at n when the paired difference, averaged over the seeds, exceeds
``NOISE_SE`` standard errors (the spread over seeds over the root of their number). Its headline
is the smallest n from which on it beats the reference at every larger n measured: a threshold
to retrain at must not rest on one lucky size.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from routing.data import pool_scalar_quality, scalar_quality
from routing.evaluate import (
    Experiment,
    FoldContext,
    ProgressHook,
    RouterFactory,
    _mean_std,
    score_routing,
)
from routing.policy import routed_mix
from routing.pool_evaluate import (
    GRID_POINTS,
    PoolExperiment,
    PoolFoldContext,
    PoolRouterFactory,
    budget_grid,
)
from routing.registry import PAIR_ROUTERS, POOL_ROUTERS
from routing.reports import rounded

__all__ = [
    "DEFAULT_SIZES",
    "LEARNING_PAIR_ROUTERS",
    "LEARNING_POOL_ROUTERS",
    "NOISE_SE",
    "CurvePoint",
    "CurveSummary",
    "Headline",
    "PairedGap",
    "Verdict",
    "check_plan",
    "cold_start_verdicts",
    "first_beating_size",
    "headlines",
    "learning_split",
    "pair_learning_curve",
    "paired_gaps",
    "pool_learning_curve",
    "quality_at_cost",
    "summarise_curve",
    "write_learning_curve",
]

DEFAULT_SIZES: tuple[int, ...] = (25, 50, 100, 200, 400)
NOISE_SE = 2.0
# The policies a router can serve before it has any label of its own (the pool's prompt-length
# router fits one line per tier, two numbers each, so it is the pool's cheapest start).
PAIR_COLD_START: tuple[str, ...] = ("prompt_length", "noun_count", "random")
POOL_COLD_START: tuple[str, ...] = ("prompt_length", "random")
# Every router of the registry but the oracle, which reads the test labels and learns nothing.
# All of them fit in seconds at n = 400 on one thread (RouteT2I and the BERT classifier, the
# slowest, in 2 to 5 s), so the default run stays within minutes.
LEARNING_PAIR_ROUTERS: tuple[str, ...] = tuple(n for n in PAIR_ROUTERS if n != "oracle")
LEARNING_POOL_ROUTERS: tuple[str, ...] = tuple(n for n in POOL_ROUTERS if n != "oracle")

Kind = Literal["pair", "pool"]
METRICS: dict[Kind, str] = {"pair": "apgr", "pool": "quality_at_cost"}
RULE = (
    f"A router beats the cold-start policy at n when its paired difference (same training and "
    f"test prompts, seed by seed) averaged over the seeds exceeds {NOISE_SE:g} standard errors "
    "(standard deviation over seeds / sqrt(seeds)); its headline is the smallest n from which "
    "on it beats it at every larger n measured, 'never' when there is none."
)


def learning_split(n_prompts: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, test) indices: the first ``size`` prompts of the seed's permutation, and all
    the others. One seed's training sets are nested as ``size`` grows."""
    if not 1 <= size < n_prompts:
        raise ValueError(f"need 1 <= n < {n_prompts} prompts, got n={size}")
    order = np.random.default_rng(seed).permutation(n_prompts)
    return np.sort(order[:size]), np.sort(order[size:])


def check_plan(sizes: Sequence[int], prompts: int, routers: Sequence[str], cold_start: str) -> None:
    """Fail before any training: every n must leave prompts to test on, and the cold-start
    policy must be among the routers run, or there is nothing to compare against."""
    if not sizes:
        raise ValueError("no training-set size n given")
    bad = [n for n in sizes if not 1 <= n < prompts]
    if bad:
        raise ValueError(f"n must lie in 1..{prompts - 1} for {prompts} prompts, got {bad}")
    if cold_start not in routers:
        raise ValueError(f"the cold-start policy {cold_start!r} is not among {list(routers)}")


@dataclass(frozen=True)
class CurvePoint:
    """One router trained on ``size`` prompts of one seed's draw and scored on the rest:
    held-out APGR (pair) or quality at cost (pool), and the seconds that fitting, predicting
    and scoring took."""

    kind: Kind
    experiment: str
    router: str
    size: int
    seed: int
    test_prompts: int
    value: float
    seconds: float


# (router name, router seed, training indices, test indices) -> the held-out score.
Scorer = Callable[[str, int, np.ndarray, np.ndarray], float]


def _curve(
    kind: Kind,
    experiment: str,
    n_prompts: int,
    routers: Sequence[str],
    score: Scorer,
    sizes: Sequence[int],
    seeds: Sequence[int],
    on_step: ProgressHook | None,
) -> list[CurvePoint]:
    points = []
    for seed in seeds:
        for size in sizes:
            train_idx, test_idx = learning_split(n_prompts, size, seed)
            for name in routers:
                started = time.perf_counter()
                # Each (seed, n) gives the routers' own randomness a seed of its own.
                value = score(name, seed * 1000 + size, train_idx, test_idx)
                elapsed = time.perf_counter() - started
                points.append(
                    CurvePoint(kind, experiment, name, size, seed, len(test_idx), value, elapsed)
                )
                if on_step is not None:
                    on_step(f"{experiment} n={size} seed {seed} {name}")
    return points


def _pair_scorer(experiment: Experiment, routers: Mapping[str, RouterFactory]) -> Scorer:
    edge, cloud = scalar_quality(experiment.test)

    def score(name: str, seed: int, train_idx: np.ndarray, test_idx: np.ndarray) -> float:
        router = routers[name](FoldContext(seed=seed, fold=0, test=experiment.test))
        router.fit(experiment.train.take(train_idx))
        prompts = [experiment.test.prompts[i] for i in test_idx]
        prs = np.asarray(router.predict_prs(prompts), dtype=np.float64)
        return score_routing(prs, edge[test_idx], cloud[test_idx])[2]

    return score


def pair_learning_curve(
    experiments: Sequence[Experiment],
    routers: Mapping[str, RouterFactory],
    sizes: Sequence[int] = DEFAULT_SIZES,
    seeds: Sequence[int] = range(5),
    on_step: ProgressHook | None = None,
) -> list[CurvePoint]:
    """Held-out APGR of every pair router at every (n, seed); ``on_step`` after each fit."""
    points = []
    for e in experiments:
        score = _pair_scorer(e, routers)
        points += _curve("pair", e.name, len(e.test), list(routers), score, sizes, seeds, on_step)
    return points


def quality_at_cost(
    predicted: np.ndarray, truth: np.ndarray, costs: Sequence[float], budgets: np.ndarray
) -> float:
    """Mean true quality of the routed mix over ``budgets`` (mean costs per request)."""
    c = np.asarray(costs, dtype=np.float64)
    return float(np.mean([routed_mix(predicted, truth, c, float(b))[1] for b in budgets]))


def _pool_scorer(
    experiment: PoolExperiment, routers: Mapping[str, PoolRouterFactory], grid_points: int
) -> Scorer:
    table, quality = experiment.table, pool_scalar_quality(experiment.table)
    budgets = budget_grid(experiment.costs, points=grid_points)

    def score(name: str, seed: int, train_idx: np.ndarray, test_idx: np.ndarray) -> float:
        router = routers[name](PoolFoldContext(seed=seed, fold=0, test=table))
        router.fit(table.take(train_idx))
        prompts = [table.prompts[i] for i in test_idx]
        predicted = np.asarray(router.predict_quality(prompts), dtype=np.float64)
        truth = quality[test_idx]
        if predicted.shape != truth.shape:
            raise ValueError(f"{name} returned {predicted.shape}, not {truth.shape}")
        return quality_at_cost(predicted, truth, experiment.costs, budgets)

    return score


def pool_learning_curve(
    experiments: Sequence[PoolExperiment],
    routers: Mapping[str, PoolRouterFactory],
    sizes: Sequence[int] = DEFAULT_SIZES,
    seeds: Sequence[int] = range(5),
    on_step: ProgressHook | None = None,
    grid_points: int = GRID_POINTS,
) -> list[CurvePoint]:
    """Quality at cost of every pool router at every (n, seed), averaged over ``grid_points``
    budgets (the pool harness's grid); ``on_step`` after each fit."""
    points = []
    for e in experiments:
        score = _pool_scorer(e, routers, grid_points)
        n = len(e.table)
        points += _curve("pool", e.name, n, list(routers), score, sizes, seeds, on_step)
    return points


@dataclass(frozen=True)
class CurveSummary:
    """Mean and standard deviation over the seeds of one router at one n."""

    kind: Kind
    experiment: str
    router: str
    size: int
    runs: int
    mean: float
    std: float


def _experiments(points: Sequence[CurvePoint]) -> list[tuple[Kind, str]]:
    return list(dict.fromkeys((p.kind, p.experiment) for p in points))


def _routers(points: Sequence[CurvePoint], kind: Kind, experiment: str) -> list[str]:
    return list(
        dict.fromkeys(p.router for p in points if (p.kind, p.experiment) == (kind, experiment))
    )


def _sizes(points: Sequence[CurvePoint]) -> list[int]:
    return sorted({p.size for p in points})


def summarise_curve(points: Sequence[CurvePoint]) -> list[CurveSummary]:
    """One summary per (kind, experiment, router, n), in the order of ``points``, n rising."""
    groups: dict[tuple[Kind, str, str, int], list[float]] = {}
    for p in sorted(points, key=lambda p: p.size):
        groups.setdefault((p.kind, p.experiment, p.router, p.size), []).append(p.value)
    order = {key: i for i, key in enumerate(_experiments(points))}
    summaries = [
        CurveSummary(kind, experiment, router, size, len(values), *_mean_std(values))
        for (kind, experiment, router, size), values in groups.items()
    ]
    return sorted(summaries, key=lambda s: order[(s.kind, s.experiment)])


@dataclass(frozen=True)
class PairedGap:
    """``router`` minus ``against`` at one n: mean and standard error over the seeds whose
    scores are both finite (a test set with no cloud gain has no APGR)."""

    kind: Kind
    experiment: str
    router: str
    against: str
    size: int
    runs: int
    mean: float
    se: float

    @property
    def beats(self) -> bool:
        """Beyond noise: at least two seeds, and the mean above ``NOISE_SE`` standard errors."""
        return bool(self.runs >= 2 and self.mean > 0 and self.mean > NOISE_SE * self.se)

    @property
    def loses(self) -> bool:
        """Behind beyond noise, by the same rule."""
        return bool(self.runs >= 2 and self.mean < 0 and -self.mean > NOISE_SE * self.se)


def paired_gaps(points: Sequence[CurvePoint], router: str, against: str) -> list[PairedGap]:
    """``router`` against ``against`` at every (kind, experiment, n) where both were run."""
    value = {(p.kind, p.experiment, p.router, p.size, p.seed): p.value for p in points}
    seeds = sorted({p.seed for p in points})
    gaps = []
    for kind, experiment in _experiments(points):
        for size in _sizes(points):
            both = [
                (
                    value[(kind, experiment, router, size, s)],
                    value[(kind, experiment, against, size, s)],
                )
                for s in seeds
                if (kind, experiment, router, size, s) in value
                and (kind, experiment, against, size, s) in value
            ]
            if not both:
                continue
            diffs = np.array([a - b for a, b in both if np.isfinite(a - b)])
            mean, std = _mean_std(diffs)
            se = float(std / np.sqrt(max(diffs.size, 1)))
            gaps.append(PairedGap(kind, experiment, router, against, size, diffs.size, mean, se))
    return gaps


def first_beating_size(gaps: Sequence[PairedGap]) -> int | None:
    """The smallest n from which on every larger n beats (``PairedGap.beats``); None: never."""
    first = None
    for gap in sorted(gaps, key=lambda g: g.size, reverse=True):
        if not gap.beats:
            break
        first = gap.size
    return first


@dataclass(frozen=True)
class Headline:
    """The smallest n from which on ``router`` beats ``against`` beyond noise (None: never
    up to the largest n measured), with the paired gaps it was read from."""

    kind: Kind
    experiment: str
    router: str
    against: str
    size: int | None
    gaps: tuple[PairedGap, ...]


def headlines(points: Sequence[CurvePoint], against: str) -> list[Headline]:
    """Every router but ``against`` itself against it, per experiment that ran it."""
    found = []
    for kind, experiment in _experiments(points):
        routers = _routers(points, kind, experiment)
        if against not in routers:
            continue
        for router in routers:
            if router == against:
                continue
            gaps = [
                g
                for g in paired_gaps(points, router, against)
                if (g.kind, g.experiment) == (kind, experiment)
            ]
            found.append(
                Headline(kind, experiment, router, against, first_beating_size(gaps), tuple(gaps))
            )
    return found


@dataclass(frozen=True)
class Verdict:
    """Which of two cold-start policies is the stronger on one pair, by the same rule: the one
    that beats the other at every n measured, or None."""

    experiment: str
    first: str
    second: str
    gaps: tuple[PairedGap, ...]

    @property
    def winner(self) -> str | None:
        if self.gaps and all(g.beats for g in self.gaps):
            return self.first
        if self.gaps and all(g.loses for g in self.gaps):
            return self.second
        return None

    def sentence(self) -> str:
        if self.winner is not None:
            loser = self.second if self.winner == self.first else self.first
            return f"{self.winner} beats {loser} beyond noise at every n."
        ahead = [g.size for g in self.gaps if g.beats]
        behind = [g.size for g in self.gaps if g.loses]
        return (
            f"neither beats the other beyond noise at every n ({self.first} ahead at n = "
            f"{_sizes_text(ahead)}, {self.second} ahead at n = {_sizes_text(behind)})."
        )


def _sizes_text(sizes: Sequence[int]) -> str:
    return ", ".join(str(s) for s in sizes) or "none"


def cold_start_verdicts(
    points: Sequence[CurvePoint], first: str = "prompt_length", second: str = "noun_count"
) -> list[Verdict]:
    """``first`` against ``second`` on every pair experiment that ran both."""
    gaps = paired_gaps(points, first, second)
    return [
        Verdict(experiment, first, second, tuple(g for g in gaps if g.experiment == experiment))
        for kind, experiment in _experiments(points)
        if kind == "pair" and {first, second} <= set(_routers(points, kind, experiment))
    ]


CSV_NAME = "learning_curve.csv"
MARKDOWN_NAME = "summary.md"
PNG_NAME = "learning_curve.png"


def write_learning_curve(
    out: Path, points: Sequence[CurvePoint], run: dict[str, object], cold_start: str
) -> None:
    """learning_curve.csv (one row per kind, experiment, router, n, seed), summary.md,
    learning_curve.png and run.json under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    with (out / CSV_NAME).open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["kind", "experiment", "metric", "router", "n", "seed", "test_prompts"]
        writer.writerow([*header, "value", "seconds"])
        for p in points:
            row = [p.kind, p.experiment, METRICS[p.kind], p.router, p.size, p.seed]
            writer.writerow(rounded([*row, p.test_prompts, p.value, p.seconds]))
    (out / MARKDOWN_NAME).write_text(curve_markdown(points, run, cold_start))
    plot_learning_curve(points, cold_start, out / PNG_NAME)


def _mean_cell(s: CurveSummary | None, digits: int) -> str:
    return (
        "" if s is None or not np.isfinite(s.mean) else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"
    )


def _gap_cell(g: PairedGap | None, digits: int) -> str:
    if g is None or not np.isfinite(g.mean):
        return ""
    return f"{g.mean:+.{digits}f} ± {g.se:.{digits}f}" + (" **\\***" if g.beats else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


_TITLES: dict[Kind, str] = {
    "pair": "held-out APGR (share of the cloud's gain recovered, mean over cloud shares)",
    "pool": "quality at cost (mean true quality of the routed mix over the budget grid, "
    "cheapest to dearest tier)",
}


def curve_markdown(points: Sequence[CurvePoint], run: dict[str, object], cold_start: str) -> str:
    """Per experiment: mean ± std per n, each router's headline against ``cold_start``, the
    paired gaps behind it and, on pairs, the prompt-length against noun-count verdict."""
    sizes = _sizes(points)
    summaries = {(s.kind, s.experiment, s.router, s.size): s for s in summarise_curve(points)}
    found = {(h.kind, h.experiment, h.router): h for h in headlines(points, cold_start)}
    verdicts = {v.experiment: v for v in cold_start_verdicts(points)}
    seeds = len({p.seed for p in points})
    lines = [
        "# Learning curve: held-out routing quality against labelled prompts",
        "",
        f"Command: `{run['command']}`  ",
        f"Wall time: {run['wall_seconds']} s; {seeds} seeds; n = {_sizes_text(sizes)}.",
        "",
        "Per seed, n prompts are drawn at random (nested: a seed's 50 hold its 25) and every "
        "router is trained on them; all the other prompts are held out and scored. Every "
        "router of a (seed, n) sees the same split. The test set shrinks as n grows, so a "
        "column compares routers on one test set, while the level of a row moves with it; "
        "read learning from the paired gaps.",
        "",
        f"Rule: {RULE} A starred gap is beyond noise.",
        "",
        "The standard error is over seeds: it holds the noise of which prompts are drawn for "
        "training and which are left to test. Every seed tests on the same data set, so at "
        "small n, where nearly every prompt is tested in every seed, it leaves out the noise "
        "of meeting another set of prompts: routers that learn nothing (prompt_length, "
        "noun_count) then differ by nearly the same amount in every seed.",
        "",
    ]
    for kind, experiment in _experiments(points):
        routers = _routers(points, kind, experiment)
        digits = 3
        lines += [f"## {kind.capitalize()} `{experiment}`: {_TITLES[kind]}", ""]
        header = ["router", *(f"n={n}" for n in sizes), f"beats {cold_start} from n"]
        rows = []
        for router in routers:
            h = found.get((kind, experiment, router))
            cells = [
                _mean_cell(summaries.get((kind, experiment, router, n)), digits) for n in sizes
            ]
            head = "(reference)" if h is None else ("never" if h.size is None else str(h.size))
            rows.append([router, *cells, head])
        lines += _table(header, rows)
        gap_rows = []
        for router in routers:
            h = found.get((kind, experiment, router))
            if h is not None:
                by_size = {g.size: g for g in h.gaps}
                gap_rows.append([router, *(_gap_cell(by_size.get(n), digits) for n in sizes)])
        if gap_rows:
            lines += [f"Paired gap against {cold_start}, mean ± standard error over seeds:", ""]
            lines += _table(["router", *(f"n={n}" for n in sizes)], gap_rows)
        verdict = verdicts.get(experiment) if kind == "pair" else None
        if verdict is not None:
            by_size = {g.size: g for g in verdict.gaps}
            lines += [f"Cold start: {verdict.first} minus {verdict.second}, paired:", ""]
            lines += _table(
                ["", *(f"n={n}" for n in sizes)],
                [["gap", *(_gap_cell(by_size.get(n), digits) for n in sizes)]],
            )
            lines += [f"Verdict: {verdict.sentence()}", ""]
    return "\n".join(lines).rstrip() + "\n"


_Y_LABELS: dict[Kind, str] = {"pair": "held-out APGR", "pool": "quality at cost (mean rating)"}


def plot_learning_curve(points: Sequence[CurvePoint], cold_start: str, path: Path) -> None:
    """One column per experiment (pairs first, as run), n on a log axis. Top: mean score per
    router, error bars one standard deviation over seeds, cold-start policies dashed. Bottom:
    each router's paired gap against ``cold_start``, error bars ``NOISE_SE`` standard errors,
    so a bar clear of zero is a win beyond noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _experiments(points)
    summaries = summarise_curve(points)
    found = headlines(points, cold_start)
    # One colour per router across panels, and each router's points nudged sideways so that
    # the error bars at one n stay apart.
    every = list(dict.fromkeys(p.router for p in points))
    tab10, dark2 = plt.get_cmap("tab10"), plt.get_cmap("Dark2")
    palette = [tab10(i) for i in range(10)] + [dark2(i) for i in range(8)]
    colours = {r: palette[i % len(palette)] for i, r in enumerate(every)}
    nudge = {r: 1.0 + 0.025 * (i - (len(every) - 1) / 2) for i, r in enumerate(every)}
    fig, axes = plt.subplots(
        2, len(panels), figsize=(6.4 * len(panels), 8.4), dpi=90, squeeze=False, sharex=True
    )
    for column, (kind, experiment) in enumerate(panels):
        top, bottom = axes[0][column], axes[1][column]
        cold = PAIR_COLD_START if kind == "pair" else POOL_COLD_START
        for router in _routers(points, kind, experiment):
            mine = [
                s
                for s in summaries
                if (s.kind, s.experiment, s.router) == (kind, experiment, router)
            ]
            top.errorbar(
                [s.size * nudge[router] for s in mine],
                [s.mean for s in mine],
                yerr=[s.std for s in mine],
                ls="--" if router in cold else "-",
                lw=2.2 if router == cold_start else 1.3,
                marker="o",
                ms=3,
                capsize=3,
                color=colours[router],
                label=router,
            )
        for h in (h for h in found if (h.kind, h.experiment) == (kind, experiment)):
            first = "never" if h.size is None else f"from {h.size}"
            bottom.errorbar(
                [g.size * nudge[h.router] for g in h.gaps],
                [g.mean for g in h.gaps],
                yerr=[NOISE_SE * g.se for g in h.gaps],
                ls="--" if h.router in cold else "-",
                lw=1.3,
                marker="o",
                ms=3,
                capsize=3,
                color=colours[h.router],
                label=f"{h.router} ({first})",
            )
        bottom.axhline(0.0, color="black", lw=0.8)
        top.set_ylabel(_Y_LABELS[kind])
        top.set_title(f"{kind} {experiment}: mean ± std over seeds", fontsize=10)
        bottom.set_ylabel(f"minus {cold_start}, paired")
        bottom.set_title(f"gap against {cold_start} ± {NOISE_SE:g} standard errors", fontsize=10)
        bottom.set_xlabel("labelled training prompts n")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xticks(_sizes(points), [str(n) for n in _sizes(points)])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
