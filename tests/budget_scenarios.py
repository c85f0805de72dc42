"""Scenarios that every budget keeper must pass in the same way. The Redis keeper runs them in
tests/integration/test_budget.py, the in-process keeper in tests/unit/test_budget_math.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from workers.budget import BudgetDecision, BudgetKeeper, worst_window_excess

TOLERANCE = 1e-6  # amounts are kept in micro-tokens


def spent(decision: BudgetDecision) -> bool:
    """Whether the decision costs a cloud generation: a cloud route or an exploration."""
    return decision.cloud or decision.explore


def check_every_window_is_bounded(keeper: BudgetKeeper) -> None:
    """For a keeper with rho 0.3 and burst 3, 300 requests that all want the cloud."""
    assert (keeper.limits.rho, keeper.limits.burst) == (0.3, 3)
    decisions = [keeper.decide(f"r{i}", wants_cloud=True) for i in range(300)]

    cost = [spent(decision) for decision in decisions]
    assert worst_window_excess(cost, 0.3) <= 3 + TOLERANCE
    # Not stingy either: every want is served as soon as a whole token has accrued.
    assert sum(cost) == 90
    assert [d.sequence for d in decisions] == list(range(1, 301))
    assert {d.reason for d in decisions} == {"granted", "ratio budget exhausted"}


def check_burst_accrues_and_is_capped(keeper: BudgetKeeper) -> None:
    """For a keeper with rho 0.5 and burst 2."""
    assert (keeper.limits.rho, keeper.limits.burst) == (0.5, 2)
    quiet = [keeper.decide(f"quiet{i}", wants_cloud=False) for i in range(10)]
    assert all(not d.cloud and d.reason == "not wanted" for d in quiet)
    assert quiet[-1].tokens_left == pytest.approx(2.0)

    busy = [keeper.decide(f"busy{i}", wants_cloud=True) for i in range(4)]
    assert [d.cloud for d in busy] == [True, True, True, False]
    assert keeper.stats()["cloud"] == 3


def check_a_redelivery_keeps_its_first_decision(
    keeper: BudgetKeeper, before_redelivery: Callable[[], None] = lambda: None
) -> None:
    """For a keeper with rho 1 and burst 5: the same request id decided again, even with the
    opposite want, gets its first decision back and spends once. ``before_redelivery`` runs
    between the first decision and the redeliveries (a clock step, say)."""
    assert (keeper.limits.rho, keeper.limits.burst) == (1.0, 5)
    first = keeper.decide("same", wants_cloud=True)
    before_redelivery()
    again = keeper.decide("same", wants_cloud=True)
    changed_mind = keeper.decide("same", wants_cloud=False)

    assert first.cloud
    assert again == first
    assert changed_mind == first
    stats = keeper.stats()
    assert (stats["requests"], stats["cloud"]) == (1, 1)
    assert stats["ratio_tokens"] == pytest.approx(0.0)


def check_exploration_costs_a_cloud_token(keeper: BudgetKeeper, both: BudgetKeeper) -> None:
    """``keeper``: rho 0.5, burst 1, exploration 0.5 (burst 1); ``both``: every rate 1."""
    first = keeper.decide("e1", wants_cloud=False)
    explored = keeper.decide("e2", wants_cloud=False)
    starved = keeper.decide("e3", wants_cloud=True)
    assert not first.explore
    assert explored.explore and not explored.cloud and explored.tokens_left == pytest.approx(0)
    assert not starved.cloud and starved.reason == "ratio budget exhausted"
    stats = keeper.stats()
    assert (stats["explore"], stats["cloud"], stats["cloud_generations"]) == (1, 0, 1)

    cloud_and_explore = both.decide("b1", wants_cloud=True)
    assert cloud_and_explore.cloud and cloud_and_explore.explore
    assert cloud_and_explore.tokens_left == pytest.approx(0)  # one cloud generation, one token
    assert both.stats()["cloud_generations"] == 1
