"""The pool policy: argmax of quality minus lambda times cost, lambda calibrated to a budget;
with two tiers it is RouteT2I's PRS < alpha rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.calibrate import calibrate_alpha, route_to_cloud
from routing.policy import (
    calibrate_lambda,
    choose_tiers,
    extra_spend,
    lambda_candidates,
    routed_mix,
)

# PRS on a grid of 2^-30: 1 - PRS is then exact, so "1 - PRS - lambda > 1/2" and "PRS < alpha"
# see the same numbers (PRS values closer than float precision of 1 - PRS are ties to the
# policy, which the grid avoids).
GRID = 2.0**30
prs_values = st.lists(st.integers(0, int(GRID)), min_size=1, max_size=60).map(
    lambda ks: np.array(ks, dtype=np.float64) / GRID
)
pools = st.integers(1, 40).flatmap(
    lambda n: st.integers(2, 5).flatmap(
        lambda t: st.tuples(
            st.lists(
                st.lists(st.floats(0, 5, allow_nan=False), min_size=t, max_size=t),
                min_size=n,
                max_size=n,
            ).map(np.array),
            st.lists(st.floats(0, 30, allow_nan=False), min_size=t, max_size=t).map(np.array),
        )
    )
)


@settings(max_examples=150, deadline=None)
@given(prs=prs_values, rho=st.floats(0, 1))
def test_two_tiers_reproduce_the_prs_threshold_rule(prs: np.ndarray, rho: float) -> None:
    scores = np.stack([np.full_like(prs, 0.5), 1.0 - prs], axis=1)
    costs = np.array([1.0, 2.0])
    lam = calibrate_lambda(scores, costs, rho * (costs[1] - costs[0]))
    alpha = calibrate_alpha(prs, rho)
    cloud = choose_tiers(scores, costs, lam) == 1
    assert np.array_equal(cloud, route_to_cloud(prs, alpha))
    assert math.isinf(lam) or lam >= 0


@settings(max_examples=100, deadline=None)
@given(pool=pools, budget=st.floats(0, 30, allow_nan=False))
def test_calibrated_lambda_meets_the_budget_with_the_most_spend(
    pool: tuple[np.ndarray, np.ndarray], budget: float
) -> None:
    predicted, costs = pool
    lam = calibrate_lambda(predicted, costs, budget)
    assert extra_spend(choose_tiers(predicted, costs, lam), costs) <= budget
    cheaper = lambda_candidates(predicted, costs)
    cheaper = cheaper[cheaper < lam]
    if cheaper.size:
        assert extra_spend(choose_tiers(predicted, costs, float(cheaper[-1])), costs) > budget


@settings(max_examples=100, deadline=None)
@given(pool=pools, lam=st.floats(0, 10, allow_nan=False))
def test_choice_maximises_quality_minus_lambda_cost(
    pool: tuple[np.ndarray, np.ndarray], lam: float
) -> None:
    predicted, costs = pool
    choice = choose_tiers(predicted, costs, lam)
    utility = predicted - lam * costs
    chosen = utility[np.arange(len(choice)), choice]
    assert np.all(chosen >= utility.max(axis=1) - 1e-9 * (1 + np.abs(utility).max()))


def test_ties_go_to_the_cheaper_tier_and_lambda_zero_takes_the_best() -> None:
    predicted = np.array([[3.0, 3.0, 2.0], [1.0, 2.0, 4.0]])
    costs = np.array([1.0, 5.0, 20.0])
    assert choose_tiers(predicted, costs, 0.0).tolist() == [0, 2]
    assert choose_tiers(predicted, costs, 1.0).tolist() == [0, 0]
    # Tier order in the table does not matter, only costs.
    assert choose_tiers(predicted[:, ::-1], costs[::-1], 0.0).tolist() == [2, 0]


def test_budgets_at_the_ends() -> None:
    predicted = np.array([[1.0, 2.0, 4.0], [1.0, 3.0, 2.0]])
    costs = np.array([0.5, 3.0, 20.0])
    assert calibrate_lambda(predicted, costs, 100.0) == 0.0
    every_cheapest = calibrate_lambda(predicted, costs, 0.0)
    assert choose_tiers(predicted, costs, every_cheapest).tolist() == [0, 0]
    assert calibrate_lambda(np.zeros((0, 3)), costs, 1.0) == math.inf
    assert calibrate_lambda(np.zeros((0, 3)), costs, 19.5) == 0.0


def test_routed_mix_spends_the_budget_in_expectation() -> None:
    predicted = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]])
    quality = np.array([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0], [1.0, 5.0]])
    costs = np.array([1.0, 3.0])
    # Budget 2: half the prompts may go dear; the router upgrades the two best gains.
    assert routed_mix(predicted, quality, costs, 2.0) == pytest.approx((2.0, 1.0 + 7.0 / 4))
    # Budget 1.25: one prompt's worth of extra spend and no more, split in expectation.
    cost, value = routed_mix(predicted, quality, costs, 1.25)
    assert cost == pytest.approx(1.25)
    assert value == pytest.approx(1.0 + 0.5 * 4.0 / 4)
    # Above what lambda = 0 spends the policy keeps the rest.
    assert routed_mix(predicted, quality, costs, 10.0) == pytest.approx((3.0, 3.5))
    assert routed_mix(predicted, quality, costs, 0.5) == pytest.approx((1.0, 1.0))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="costs"):
        choose_tiers(np.zeros((2, 2)), [1.0], 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        choose_tiers(np.zeros((2, 2)), [1.0, -1.0], 0.0)
    with pytest.raises(ValueError, match="lambda"):
        choose_tiers(np.zeros((2, 2)), [1.0, 2.0], -1.0)
    with pytest.raises(ValueError, match="budget"):
        calibrate_lambda(np.zeros((2, 2)), [1.0, 2.0], -0.1)
    with pytest.raises(ValueError, match="non-finite"):
        calibrate_lambda(np.array([[np.nan, 1.0]]), [1.0, 2.0], 0.1)
