"""Scenarios that every budget keeper must pass in the same way. The Redis keeper runs them in
tests/integration/test_budget.py, the in-process keeper in tests/unit/test_budget_math.py."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import strategies as st

from workers.services.budget import (
    MAX_AMOUNT,
    MICRO,
    BudgetDecision,
    BudgetKeeper,
    BudgetLimits,
    worst_window_excess,
)
from workers.settings import Settings

TOLERANCE = 1e-6  # for sums of floats; the keepers count in exact micro-units

# A request as the property tests draw it: an id (ids repeat: redeliveries), the tiers it
# prefers, best first, and the tiers it would explore.
Ask = tuple[int, list[str], list[str]]

CLOUD_FIRST = ("cloud", "edge")
BOTH = ("edge", "cloud")

# Four tiers whose extra costs over "small" are 2, 5 and 10.
FOUR_TIERS = {"small": 1.0, "medium": 3.0, "large": 6.0, "huge": 11.0}


def two_tiers(rho: float, burst: float, **budget: float) -> BudgetLimits:
    """Today's cloud-share buckets, built as the workers build them: ``rho`` cloud generations
    a request up to ``burst``, priced at the settings' default costs (a cloud image costs 9
    units more than an edge one). ``budget`` holds any other budget settings; exploration
    is off unless it names it."""
    chosen = {"exploration_rate": 0.0, **budget, "cloud_ratio": rho, "cloud_burst": burst}
    return BudgetLimits.from_settings(Settings.model_validate(chosen))


def micro(amount: float | None) -> int:
    """An amount the keeper reported, back in the micro-units it keeps."""
    assert amount is not None
    return round(amount * MICRO)


def clouds(decisions: Sequence[BudgetDecision]) -> list[int]:
    """Cloud generations per decision: its route and its exploration."""
    return [(d.tier == "cloud") + ("cloud" in d.explored) for d in decisions]


@st.composite
def pools(draw: st.DrawFn, tiers: int) -> BudgetLimits:
    """A pool of ``tiers`` tiers at random costs with random buckets that can hold any tier."""
    costs = draw(st.lists(st.floats(0.0, 50.0), min_size=tiers, max_size=tiers))
    tier_costs = {f"t{i}": cost for i, cost in enumerate(costs)}
    probe = BudgetLimits(tier_costs, budget_per_request=0.0, burst=MAX_AMOUNT)
    dearest = max(probe.extra_cost(tier) for tier in tier_costs)
    return BudgetLimits(
        tier_costs,
        budget_per_request=draw(st.floats(0.0, max(dearest, 1e-3))),
        burst=dearest + draw(st.floats(0.0, 30.0)),
        exploration_rate=draw(st.floats(0.0, 0.5)),
    )


def ask(tiers: int, ids: int) -> st.SearchStrategy[Ask]:
    names = st.sampled_from([f"t{i}" for i in range(tiers)])
    return st.tuples(
        st.integers(0, ids),
        st.lists(names, min_size=1, max_size=tiers, unique=True),
        st.lists(names, max_size=tiers, unique=True),
    )


def asks(tiers: int, ids: int, size: int) -> st.SearchStrategy[list[Ask]]:
    return st.lists(ask(tiers, ids), max_size=size)


def decide_all(keeper: BudgetKeeper, requests: Sequence[Ask]) -> list[BudgetDecision]:
    return [keeper.decide(f"h{i}", preference=p, explore=e) for i, p, e in requests]


def check_the_rules(keeper: BudgetKeeper, requests: Sequence[Ask]) -> list[BudgetDecision]:
    """Every decision follows the rules, in exact micro-units: the first preferred tier the
    bucket holds is granted (the cheapest when none), a request is explored exactly when the
    exploration bucket holds a token and the spend bucket the other tiers' extra costs too,
    the bucket stays in [0, C], a replay returns the first decision and spends nothing, and
    over the first decisions the bound holds in every window. Returns the decisions."""
    limits = keeper.limits
    amounts = limits.micro()
    per_request, burst = amounts.per_request, amounts.burst
    extra = limits.extra_micro
    first: dict[int, BudgetDecision] = {}
    tokens = explorations = 0
    made = decide_all(keeper, requests)
    for (request, preference, explore), decision in zip(requests, made, strict=True):
        if request in first:
            assert decision == first[request]
            continue
        first[request] = decision
        available = min(burst, tokens + per_request)
        explorations = min(amounts.explore_burst, explorations + amounts.explore_rate)
        ranked = [*preference, limits.cheapest]
        granted = ranked.index(decision.tier)
        assert all(extra[tier] > available for tier in ranked[:granted])
        assert extra[decision.tier] <= available
        wanted = preference[0]
        assert (decision.reason == "granted") == (decision.tier == wanted)
        if decision.reason != "granted":
            assert decision.reason == f"wanted {wanted}: budget exhausted"
        others = tuple(tier for tier in explore if tier != decision.tier)
        left = available - extra[decision.tier]
        can_explore = explorations >= MICRO and sum(extra[tier] for tier in others) <= left
        assert decision.explored == (others if can_explore else ())
        explorations -= MICRO if decision.explored else 0
        cost = extra[decision.tier] + sum(extra[tier] for tier in decision.explored)
        assert micro(decision.spent) == cost
        tokens = micro(decision.tokens_left)
        assert tokens == available - cost
        assert 0 <= tokens <= burst

    decisions = sorted(first.values(), key=lambda d: d.sequence or 0)
    assert [d.sequence for d in decisions] == list(range(1, len(first) + 1))
    spends = [micro(d.spent) for d in decisions]
    assert worst_window_excess(spends, per_request) <= burst
    stats = keeper.stats()
    assert micro(stats["spent"]) == sum(spends)
    for tier in limits.tier_costs:
        images = sum(tier in (d.tier, *d.explored) for d in decisions)
        assert stats[f"{tier}_generations"] == images
    return made


def check_every_window_is_bounded(keeper: BudgetKeeper) -> None:
    """For two tiers with rho 0.3 and burst 3: 300 requests that all want the cloud."""
    assert (keeper.limits.budget_per_request, keeper.limits.burst) == (2.7, 27)
    decisions = [keeper.decide(f"r{i}", preference=CLOUD_FIRST) for i in range(300)]

    assert worst_window_excess(clouds(decisions), 0.3) <= 3 + TOLERANCE
    assert worst_window_excess([d.spent for d in decisions], 2.7) <= 27 + TOLERANCE
    # Not stingy either: every want is served as soon as the bucket holds a cloud's worth.
    assert sum(clouds(decisions)) == 90
    assert [d.sequence for d in decisions] == list(range(1, 301))
    assert {d.reason for d in decisions} == {"granted", "wanted cloud: budget exhausted"}


def check_burst_accrues_and_is_capped(keeper: BudgetKeeper) -> None:
    """For two tiers with rho 0.5 and burst 2."""
    quiet = [keeper.decide(f"quiet{i}", preference=["edge"]) for i in range(10)]
    assert all(d.tier == "edge" and d.reason == "granted" and d.spent == 0 for d in quiet)
    assert quiet[-1].tokens_left == pytest.approx(2 * 9)

    busy = [keeper.decide(f"busy{i}", preference=CLOUD_FIRST) for i in range(4)]
    assert [d.tier for d in busy] == ["cloud", "cloud", "cloud", "edge"]
    stats = keeper.stats()
    assert (stats["cloud_routes"], stats["edge_routes"], stats["spent"]) == (3, 11, 27)


def check_a_redelivery_keeps_its_first_decision(
    keeper: BudgetKeeper, before_redelivery: Callable[[], None] = lambda: None
) -> None:
    """For two tiers with rho 1 and burst 5: the same request id decided again, even with
    another preference, gets its first decision back and spends once. ``before_redelivery``
    runs between the first decision and the redeliveries (a clock step, say)."""
    first = keeper.decide("same", preference=CLOUD_FIRST, explore=BOTH)
    before_redelivery()
    again = keeper.decide("same", preference=CLOUD_FIRST, explore=BOTH)
    changed_mind = keeper.decide("same", preference=["edge"])

    assert first.tier == "cloud" and first.spent == 9
    assert again == first
    assert changed_mind == first
    stats = keeper.stats()
    assert (stats["requests"], stats["cloud_routes"], stats["spent"]) == (1, 1, 9)
    assert stats["spend_tokens"] == pytest.approx(0.0)


def check_exploration_costs_the_extra_tier(keeper: BudgetKeeper, both: BudgetKeeper) -> None:
    """``keeper``: two tiers, rho 0.5, burst 1, exploration 0.5 (burst 1); ``both``: every
    rate 1. An explored edge route costs a cloud generation, an explored cloud route nothing
    more."""
    first = keeper.decide("e1", preference=["edge"], explore=BOTH)
    explored = keeper.decide("e2", preference=["edge"], explore=BOTH)
    starved = keeper.decide("e3", preference=CLOUD_FIRST, explore=BOTH)
    assert first.explored == ()
    assert (explored.tier, explored.explored, explored.spent) == ("edge", ("cloud",), 9)
    assert explored.tokens_left == pytest.approx(0)
    assert starved.tier == "edge" and starved.reason == "wanted cloud: budget exhausted"
    stats = keeper.stats()
    assert (stats["explored"], stats["cloud_routes"], stats["cloud_generations"]) == (1, 0, 1)
    assert stats["edge_generations"] == 3

    cloud_and_edge = both.decide("b1", preference=CLOUD_FIRST, explore=BOTH)
    assert (cloud_and_edge.tier, cloud_and_edge.explored) == ("cloud", ("edge",))
    assert cloud_and_edge.tokens_left == pytest.approx(0)  # one cloud generation's worth
    assert both.stats()["cloud_generations"] == 1


def check_a_refused_choice_gets_the_best_affordable_tier(keeper: BudgetKeeper) -> None:
    """For ``FOUR_TIERS`` with 4 units a request up to 10."""
    by_cost = ["huge", "large", "medium", "small"]
    expected = [
        # preference, granted, reason, tokens left
        (by_cost, "medium", "wanted huge: budget exhausted", 2),  # 4 in the bucket
        (by_cost, "large", "wanted huge: budget exhausted", 1),  # 6
        (["huge", "medium"], "medium", "wanted huge: budget exhausted", 3),  # 5
        (["huge"], "small", "wanted huge: budget exhausted", 7),  # 7: nothing else asked
        (["huge"], "huge", "granted", 0),  # 10, the burst
        (["medium", "huge"], "medium", "granted", 2),  # the caller's rank, not the price
        (["small", "huge"], "small", "granted", 6),  # a free tier ends the ranking
    ]
    for i, (preference, tier, reason, left) in enumerate(expected):
        decision = keeper.decide(f"f{i}", preference=preference)
        assert (decision.tier, decision.reason, decision.tokens_left) == (tier, reason, left)
    stats = keeper.stats()
    assert (stats["small_routes"], stats["medium_routes"], stats["large_routes"]) == (2, 3, 1)
    assert (stats["huge_routes"], stats["spent"]) == (1, 2 + 5 + 2 + 10 + 2)


def check_exploration_over_many_tiers(keeper: BudgetKeeper) -> None:
    """For ``FOUR_TIERS`` with 10 units a request up to 20 and one exploration a request:
    an exploration takes the extra cost of every tier it adds, and waits until the bucket
    holds them all after the granted tier."""
    every = list(FOUR_TIERS)
    too_dear = keeper.decide("x1", preference=["large"], explore=every)  # 10 in the bucket
    assert (too_dear.tier, too_dear.explored, too_dear.tokens_left) == ("large", (), 5)
    cheap = keeper.decide("x2", preference=["small"], explore=["medium", "huge"])  # 15
    assert (cheap.tier, cheap.explored, cheap.spent, cheap.tokens_left) == (
        "small",
        ("medium", "huge"),
        12,
        3,
    )
    dear = keeper.decide("x3", preference=["huge", "small"], explore=["small"])  # 13
    assert (dear.tier, dear.explored, dear.spent, dear.tokens_left) == ("huge", ("small",), 10, 3)

    stats = keeper.stats()
    generations = [stats[f"{tier}_generations"] for tier in every]
    assert generations == [2, 1, 1, 2]
    assert (stats["explored"], stats["spent"], stats["exploration_tokens"]) == (2, 27, 0)


def check_the_reason_names_the_bucket_that_refused_the_first_choice(keeper: BudgetKeeper) -> None:
    """For ``FOUR_TIERS`` with 4 units a request up to 10 and a rate bucket that starts empty
    and refills too slowly to matter here."""
    assert keeper.limits.rate_per_second is not None and keeper.limits.rate_per_second < 0.01
    by_spend = keeper.decide("s", preference=["huge", "medium"])  # medium: refused by rate
    assert (by_spend.tier, by_spend.reason) == ("small", "wanted huge: budget exhausted")
    by_rate = keeper.decide("r", preference=["medium", "huge"])  # huge: refused by spend
    assert (by_rate.tier, by_rate.reason) == ("small", "wanted medium: rate budget exhausted")


def check_a_refund_gives_the_charge_back_once_within_capacity(keeper: BudgetKeeper) -> None:
    """For two tiers with rho 1 and burst 2 (9 units a request up to 18): a failed request's
    charges come back once, summed over the ids it was charged under, never beyond C."""
    charged = keeper.decide("a", preference=CLOUD_FIRST)
    assert (charged.tier, charged.spent, charged.tokens_left) == ("cloud", 9, 0)
    assert keeper.refund("a", ["a"]) == 9
    assert keeper.stats()["spend_tokens"] == 9
    assert keeper.refund("a", ["a"]) == 0, "a request is refunded once"
    assert keeper.stats()["spend_tokens"] == 9

    # A request charged twice (its answer, then a reroute) gets both back.
    keeper.decide("b", preference=CLOUD_FIRST)  # 18 in the bucket, 9 left
    keeper.decide("b/reroute/generate:edge", preference=CLOUD_FIRST)  # 18, 9 left
    assert keeper.refund("b", ["b", "b/reroute/generate:edge", "b/escalate/0"]) == 9
    assert keeper.stats()["spend_tokens"] == 18, "never beyond the capacity"

    # Nothing charged (an edge answer, or markers long expired): nothing given back.
    keeper.decide("c", preference=["edge"])
    assert keeper.refund("c", ["c"]) == 0
    assert keeper.refund("never-decided", ["never-decided"]) == 0
    stats = keeper.stats()
    assert (stats["spent"], stats["refunded"], stats["spend_tokens"]) == (27, 18, 18)
    # The bound holds on what was kept: spend less refunds over N decisions <= B*N + C.
    assert stats["spent"] - stats["refunded"] <= 9 * stats["requests"] + 18
