"""The pool policy: per prompt, the tier that maximises predicted quality minus lambda times
cost, with lambda calibrated on recent predictions so that the expected spend meets a budget.

It is the N-tier form of RouteT2I's threshold rule (``routing.calibrate``). With two tiers
scored (edge 1/2, cloud 1 - PRS), as RouteT2I scores a pair, the cloud wins exactly when
``1 - PRS - lambda * dc > 1/2``, that is PRS < alpha with alpha = 1/2 - lambda * dc; lambda >= 0
is alpha <= 1/2, and the lambda calibrated for an extra spend of rho * dc per request makes the
same decisions as the alpha calibrated for a cloud share rho (property-tested). The budget
keeper stays the hard guarantee behind it.

Budgets are spend *above the cheapest tier* per request, the unit the budget keeper counts in
(DESIGN.md: a tier costs cost(tier) - cost(cheapest)).

The rule, written here once: a tier's value is its predicted quality minus lambda times its cost
(``net_values``), the best value wins and a tie goes to the cheaper tier. ``choose_tiers`` applies
it to a batch in the form calibration compares in, ``rank_tiers`` orders one prediction's tiers
by it (the workers' answer, then the replacements when a tier gives up), and ``margins`` is how
far each prediction is from another choice (the informed exploration's boundary). Two-tier
routers' PRS become every tier's score through ``pair_scores``; ``break_ties`` separates tied
scores by a draw fixed per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def check_costs(costs: np.ndarray | Sequence[float], n_tiers: int) -> np.ndarray:
    """Costs as an array after checking there is one finite, non-negative cost per tier."""
    c = np.asarray(costs, dtype=np.float64)
    if c.shape != (n_tiers,):
        raise ValueError(f"expected {n_tiers} costs, got shape {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"costs must be finite and non-negative, got {c}")
    return c


def _check_predictions(predicted: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    p = np.asarray(predicted, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"predictions must be (prompts, tiers), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("predictions hold non-finite values")
    return p


def choose_tiers(
    predicted: np.ndarray | Sequence[Sequence[float]],
    costs: np.ndarray | Sequence[float],
    lam: float,
) -> np.ndarray:
    """argmax_t predicted[:, t] - lam * costs[t] per prompt; a tie goes to the cheaper tier.

    The comparison is written as "the upgrade's quality per cost unit exceeds lambda", scanning
    tiers from cheap to dear, so lambda and the candidates of ``calibrate_lambda`` are compared
    in one form and a calibrated lambda reproduces exactly the decisions it was chosen for.
    """
    p = _check_predictions(predicted)
    c = check_costs(costs, p.shape[1])
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lambda must be non-negative, got {lam}")
    order = np.argsort(c, kind="stable")
    best = np.full(p.shape[0], order[0], dtype=np.int64)
    for tier in order[1:]:
        gain = p[:, tier] - p[np.arange(p.shape[0]), best]
        extra = c[tier] - c[best]
        # A cost gap near zero overflows the rate to inf: the right limit, an upgrade at any price.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            upgrade = np.where(extra > 0, gain / np.where(extra > 0, extra, 1.0) > lam, gain > 0)
        best = np.where(upgrade, tier, best)
    return best


def extra_spend(choice: np.ndarray, costs: np.ndarray | Sequence[float]) -> float:
    """Mean cost per request above the cheapest tier of the chosen tiers."""
    c = np.asarray(costs, dtype=np.float64)
    if len(choice) == 0:
        return 0.0
    return float(np.mean(c[np.asarray(choice)] - c.min()))


def lambda_candidates(
    predicted: np.ndarray | Sequence[Sequence[float]], costs: np.ndarray | Sequence[float]
) -> np.ndarray:
    """Every lambda at which some decision can change: 0 and each positive upgrade rate
    (q_t - q_s) / (c_t - c_s), c_t > c_s, sorted and unique."""
    p = _check_predictions(predicted)
    c = check_costs(costs, p.shape[1])
    rates = [np.zeros(1)]
    for t in range(len(c)):
        for s in range(len(c)):
            if c[t] > c[s]:
                with np.errstate(over="ignore"):
                    rate = (p[:, t] - p[:, s]) / (c[t] - c[s])
                rates.append(rate[rate > 0])
    return np.unique(np.concatenate(rates))


def calibrate_lambda(
    predicted: np.ndarray | Sequence[Sequence[float]],
    costs: np.ndarray | Sequence[float],
    extra_budget: float,
) -> float:
    """The smallest lambda >= 0 whose choices spend at most ``extra_budget`` per request above
    the cheapest tier, on a sample of recent predictions (n, tiers).

    The spend falls as lambda grows, so this is the most quality the budget allows; the search
    runs over the values where a decision changes (``lambda_candidates``). A tie block moves
    all together, as in ``calibrate_alpha``. An empty sample gives +inf (everything on the
    cheapest tier) unless the budget covers the dearest tier, failing cheap until there are
    predictions to calibrate on.
    """
    p = _check_predictions(predicted)
    c = check_costs(costs, p.shape[1])
    if math.isnan(extra_budget) or extra_budget < 0:
        raise ValueError(f"the budget must be non-negative, got {extra_budget}")
    if p.shape[0] == 0:
        return 0.0 if extra_budget >= c.max() - c.min() else math.inf
    candidates = lambda_candidates(p, c)
    low, high = 0, len(candidates) - 1
    if extra_spend(choose_tiers(p, c, float(candidates[high])), c) > extra_budget:
        # Only possible through rounding in the scan: the dearest rate chooses the cheapest.
        return math.inf
    while low < high:
        middle = (low + high) // 2
        if extra_spend(choose_tiers(p, c, float(candidates[middle])), c) <= extra_budget:
            high = middle
        else:
            low = middle + 1
    return float(candidates[low])


def routed_mix(
    predicted: np.ndarray,
    quality: np.ndarray,
    costs: np.ndarray | Sequence[float],
    budget: float,
) -> tuple[float, float]:
    """(mean cost, mean true quality) per request of the policy at a mean-cost ``budget``,
    lambda calibrated on these predictions.

    The calibrated lambda spends at most the budget; the next smaller candidate spends more.
    Mixing their decisions at random in the proportion that spends exactly the budget is what
    a randomised last decision gives in expectation (the pair harness's ``cumulative_gain``
    does the same for ties), so routers are compared at equal spend. A budget above what
    lambda = 0 spends leaves the rest unspent: the policy never buys a tier it rates lower.
    """
    p = _check_predictions(predicted)
    c = check_costs(costs, p.shape[1])
    rows = np.arange(p.shape[0])
    extra = budget - float(c.min())
    lam = calibrate_lambda(p, c, max(extra, 0.0))
    choice = choose_tiers(p, c, lam)
    cost, value = float(np.mean(c[choice])), float(np.mean(quality[rows, choice]))
    candidates = lambda_candidates(p, c)
    below = candidates[candidates < lam]
    if below.size == 0 or cost >= budget:
        return cost, value
    richer = choose_tiers(p, c, float(below[-1]))
    rich_cost, rich_value = float(np.mean(c[richer])), float(np.mean(quality[rows, richer]))
    if rich_cost <= cost:
        return cost, value
    share = (budget - cost) / (rich_cost - cost)
    return budget, value + share * (rich_value - value)


def net_values(
    predicted: np.ndarray | Sequence[Sequence[float]],
    costs: np.ndarray | Sequence[float],
    lam: float,
) -> np.ndarray:
    """quality - lam * cost per prompt and tier: what the policy maximises. A tier a prediction
    does not score is given -inf by the caller and is never chosen over one it scores."""
    values: np.ndarray = np.asarray(predicted, dtype=np.float64) - lam * np.asarray(
        costs, dtype=np.float64
    )
    return values


def rank_tiers(quality: Mapping[str, float], costs: Mapping[str, float], lam: float) -> list[str]:
    """The tiers of ``costs`` (cheapest first), best first by ``net_values``; a tie and an
    infinite lambda go to the cheaper tier."""
    if math.isinf(lam):
        return list(costs)
    names = list(costs)
    row = [quality.get(t, -math.inf) for t in names]
    value = dict(zip(names, net_values([row], list(costs.values()), lam)[0], strict=True))
    return sorted(names, key=lambda t: (-value[t], costs[t]))


def margins(
    predicted: np.ndarray | Sequence[Sequence[float]],
    costs: np.ndarray | Sequence[float],
    lam: float,
) -> np.ndarray:
    """Per prediction (prompts, tiers), how far the policy is from choosing another tier: the
    best tier's net value minus the runner-up's. 0 is a tie; an infinite lambda (everything on
    the cheapest tier), a single tier or no predictions give +inf."""
    p = np.asarray(predicted, dtype=np.float64)
    if math.isinf(lam) or p.ndim != 2 or p.shape[1] < 2 or p.shape[0] == 0:
        return np.full(len(p), math.inf)
    top_two = -np.sort(-net_values(p, costs, lam), axis=1)[:, :2]
    gap: np.ndarray = top_two[:, 0] - top_two[:, 1]
    return gap


def pair_scores(prs: np.ndarray | Sequence[float], n_tiers: int) -> np.ndarray:
    """A two-tier router's PRS as scores of every tier of a pool, cheapest first (prompts,
    tiers): the cheapest 1/2 and the dearest 1 - PRS (under which the rule is RouteT2I's
    PRS < alpha, above), the tiers between spread by their rank in cost: the harder the prompt
    for the cheapest tier, the more every dearer tier is worth."""
    steps = max(n_tiers - 1, 1)
    column = np.asarray(prs, dtype=np.float64).reshape(-1, 1)
    scores: np.ndarray = 0.5 + (0.5 - column) * np.arange(n_tiers) / steps
    return scores


# Scores that tie (a heuristic's equal word counts) are told apart by the request: a block
# of tied prompts can then be bought in part, so calibration can meet the budget inside it.
TIE_BREAK = 1e-6


def break_ties(quality: Mapping[str, float], draw: float, cheapest: str) -> dict[str, float]:
    """``quality`` with every dearer tier's score moved by less than ``TIE_BREAK``, by a draw
    in [0, 1) fixed per request; the cheapest tier's score stays."""
    shift = TIE_BREAK * (draw - 0.5)
    return {tier: score + (shift if tier != cheapest else 0.0) for tier, score in quality.items()}
