"""The budget keeper's arithmetic, its argument checks and the in-process keeper, which need
no Redis server. The Redis keeper's twin of these tests is tests/integration/test_budget.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import Redis

from tests.budget_scenarios import (
    CLOUD_FIRST,
    FOUR_TIERS,
    TOLERANCE,
    asks,
    check_a_redelivery_keeps_its_first_decision,
    check_a_refund_gives_the_charge_back_once_within_capacity,
    check_a_refused_choice_gets_the_best_affordable_tier,
    check_burst_accrues_and_is_capped,
    check_every_window_is_bounded,
    check_exploration_costs_the_extra_tier,
    check_exploration_over_many_tiers,
    check_the_reason_names_the_bucket_that_refused_the_first_choice,
    check_the_rules,
    clouds,
    micro,
    pools,
    two_tiers,
)
from workers.services.budget import (
    MICRO,
    BudgetDecision,
    BudgetKeeper,
    BudgetLimits,
    LocalBudgetKeeper,
    RedisBudgetKeeper,
    _escape_glob,
    _micro,
    budget_keeper_from_settings,
    worst_window_excess,
)
from workers.settings import Settings


class FakeClock:
    """Microseconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * MICRO)


@pytest.mark.parametrize(
    ("amount", "micro_units"),
    [
        (0.3, 300_000),
        (0.7, 700_000),
        (1.0, MICRO),
        (5.0, 5 * MICRO),
        (1e-7, 0),
        (0.1234567, 123_456),
    ],
)
def test_amounts_become_micro_units_rounded_down(amount: float, micro_units: int) -> None:
    assert _micro(amount) == micro_units


def test_extra_costs_are_rounded_up_and_measured_from_the_cheapest() -> None:
    limits = BudgetLimits(
        {"a": 2.5, "b": 0.1234567, "c": 0.1, "d": 0.1}, budget_per_request=0, burst=3
    )
    assert limits.cheapest == "c"  # the first of the cheapest
    assert limits.extra_micro == {"a": 2_400_000, "b": 23_457, "c": 0, "d": 0}
    assert limits.extra_cost("b") == 0.023457


def test_two_tiers_from_the_settings_are_the_cloud_share_in_cost_units() -> None:
    limits = BudgetLimits.from_settings(
        Settings(
            edge_cost=0.5,
            cloud_cost=2.0,
            cloud_ratio=0.3,
            cloud_burst=4,
            cloud_rate_per_second=3,
            cloud_rate_burst=6,
            exploration_rate=0.1,
        )
    )
    assert limits.tier_costs == {"edge": 0.5, "cloud": 2.0}
    assert limits.extra_cost("cloud") == 1.5
    assert (limits.budget_per_request, limits.burst) == (0.45, 6.0)
    assert (limits.rate_per_second, limits.rate_burst) == (4.5, 9.0)
    assert (limits.exploration_rate, limits.exploration_burst) == (0.1, 2.0)
    assert limits.micro().per_request == 450_000  # exactly 0.3 cloud images, not a unit less


def test_a_cloud_cheaper_than_the_edge_is_refused() -> None:
    with pytest.raises(ValueError, match="cloud_cost"):
        Settings(edge_cost=2.0, cloud_cost=1.0)


def test_glob_characters_in_a_prefix_match_only_themselves() -> None:
    assert _escape_glob("a*b?[c]\\d") == "a\\*b\\?\\[c\\]\\\\d"


@pytest.mark.parametrize(
    ("spent", "per_request", "excess"),
    [
        ([], 0.5, 0.0),
        ([0, 0], 0.5, 0.0),
        ([1, 1, 1], 0.5, 1.5),
        ([1, 0, 0, 0, 1, 1], 0.25, 1.5),  # the last two, not all six
        ([9, 0, 4.5, 0], 2.0, 7.5),  # the first three
    ],
)
def test_worst_window_excess_finds_the_worst_window(
    spent: list[float], per_request: float, excess: float
) -> None:
    assert worst_window_excess(spent, per_request) == pytest.approx(excess)


TWO = {"edge": 1.0, "cloud": 10.0}


@pytest.mark.parametrize(
    "bad",
    [
        {"tier_costs": {}, "budget_per_request": 1.0, "burst": 9.0},
        {"tier_costs": {"": 1.0, "b": 2.0}, "budget_per_request": 1.0, "burst": 9.0},
        {"tier_costs": {"a": -1.0, "b": 2.0}, "budget_per_request": 1.0, "burst": 9.0},
        {"tier_costs": {"a": float("nan")}, "budget_per_request": 1.0, "burst": 9.0},
        {"tier_costs": {"a": 1.0, "b": 2e7}, "budget_per_request": 1.0, "burst": 9.0},
        {"tier_costs": TWO, "budget_per_request": -0.1, "burst": 9.0},
        {"tier_costs": TWO, "budget_per_request": float("inf"), "burst": 9.0},
        {"tier_costs": TWO, "budget_per_request": 1.0, "burst": 8.9},  # cannot hold a cloud
        {"tier_costs": TWO, "budget_per_request": 1.0, "burst": 9.0, "rate_per_second": 0.0},
        {"tier_costs": TWO, "budget_per_request": 1.0, "burst": 9.0, "rate_per_second": 1e-7},
        {"tier_costs": TWO, "budget_per_request": 1.0, "burst": 9.0, "rate_per_second": 1.0},
        {"tier_costs": TWO, "budget_per_request": 1.0, "burst": 9.0, "exploration_rate": 1.1},
        {"tier_costs": TWO, "budget_per_request": 1.0, "burst": 9.0, "exploration_burst": 0.9},
    ],
)
def test_impossible_buckets_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BudgetLimits(**bad)


def test_a_pool_whose_tiers_cost_alike_spends_nothing() -> None:
    keeper = LocalBudgetKeeper(BudgetLimits({"a": 3.0, "b": 3.0}, budget_per_request=0, burst=0))
    decision = keeper.decide("r", preference=["b"], explore=["a", "b"])
    assert (decision.tier, decision.explored, decision.spent) == ("b", (), 0)
    with pytest.raises(ValueError, match="rate_per_second"):
        two_tiers(0.3, 2, edge_cost=3.0, cloud_cost=3.0, cloud_rate_per_second=1.0)


def test_markers_must_live_at_least_a_second() -> None:
    limits = two_tiers(0.3, 2.0)
    with pytest.raises(ValueError):
        LocalBudgetKeeper(limits, marker_ttl_seconds=0)
    with pytest.raises(ValueError):  # building a client connects to nothing
        RedisBudgetKeeper(Redis(), limits, marker_ttl_seconds=0)


@pytest.mark.parametrize(
    "keeper",
    [LocalBudgetKeeper(two_tiers(0.3, 2.0)), RedisBudgetKeeper(Redis(), two_tiers(0.3, 2.0))],
    ids=["local", "redis"],
)
@pytest.mark.parametrize(
    ("request_id", "preference", "explore"),
    [
        ("", CLOUD_FIRST, ()),  # no request id
        ("r", (), ()),  # nothing preferred
        ("r", ["cloud", "gpu"], ()),  # a tier the pool does not have
        ("r", ["edge"], ["gpu"]),
    ],
)
def test_a_decision_needs_an_id_and_known_tiers(
    keeper: BudgetKeeper, request_id: str, preference: list[str], explore: list[str]
) -> None:
    with pytest.raises(ValueError):
        keeper.decide(request_id, preference=preference, explore=explore)
    with pytest.raises(TypeError):  # one name is not a ranking
        keeper.decide("r", preference="cloud")


def test_the_settings_pick_the_keeper() -> None:
    local = budget_keeper_from_settings(Settings(budget_backend="local", cloud_ratio=0.2))
    shared = BudgetKeeper.from_settings(Settings(budget_backend="redis", cloud_burst=3.0))
    assert isinstance(local, LocalBudgetKeeper)
    assert local.limits.budget_per_request == pytest.approx(0.2 * 9)
    assert isinstance(shared, RedisBudgetKeeper)
    assert shared.limits.burst == 27.0


def test_cloud_share_is_bounded_and_every_whole_cloud_is_served() -> None:
    check_every_window_is_bounded(LocalBudgetKeeper(two_tiers(0.3, 3)))


def test_burst_accrues_while_nobody_wants_cloud_and_is_capped() -> None:
    check_burst_accrues_and_is_capped(LocalBudgetKeeper(two_tiers(0.5, 2)))


def test_a_redelivered_request_gets_its_first_decision_and_spends_once() -> None:
    clock = FakeClock()
    keeper = LocalBudgetKeeper(two_tiers(1.0, 5), marker_ttl_seconds=60, clock=clock)
    check_a_redelivery_keeps_its_first_decision(keeper, lambda: clock.advance(59))

    clock.advance(1)  # the marker has expired: the request is decided anew
    assert keeper.decide("same", preference=["edge"]).sequence == 2


def test_a_failed_requests_charge_is_given_back_once_within_capacity() -> None:
    clock = FakeClock()
    keeper = LocalBudgetKeeper(two_tiers(1.0, 2), marker_ttl_seconds=60, clock=clock)
    check_a_refund_gives_the_charge_back_once_within_capacity(keeper)

    # The refund's marker lives as long as a decision's: after it, a charge long expired
    # is nothing to give back.
    clock.advance(60)
    assert keeper.refund("a", ["a"]) == 0
    keeper.reset()
    assert keeper.stats()["refunded"] == 0


def test_reset_brings_the_buckets_back_empty() -> None:
    keeper = LocalBudgetKeeper(two_tiers(0.5, 4))
    for i in range(8):
        keeper.decide(f"fill{i}", preference=["edge"])
    assert keeper.stats()["spend_tokens"] == pytest.approx(4 * 9)

    keeper.reset()

    after = keeper.decide("fill0", preference=CLOUD_FIRST)  # its marker went too
    assert after.tier == "edge"
    assert after.reason == "wanted cloud: budget exhausted"
    assert after.tokens_left == pytest.approx(0.5 * 9)
    assert after.sequence == 1


def test_a_refused_choice_gets_the_best_tier_the_budget_affords() -> None:
    check_a_refused_choice_gets_the_best_affordable_tier(
        LocalBudgetKeeper(BudgetLimits(FOUR_TIERS, budget_per_request=4, burst=10))
    )


def test_the_rate_bucket_caps_cloud_generations_per_second() -> None:
    clock = FakeClock()
    limits = two_tiers(1.0, 100, cloud_rate_per_second=20, cloud_rate_burst=2)
    keeper = LocalBudgetKeeper(limits, clock=clock)
    first = keeper.decide("first", preference=CLOUD_FIRST)
    assert (first.tier, first.reason) == ("edge", "wanted cloud: rate budget exhausted")

    clock.advance(0.1)  # two clouds' worth
    rush = [keeper.decide(f"rush{i}", preference=CLOUD_FIRST) for i in range(4)]
    assert [d.tier for d in rush] == ["cloud", "cloud", "edge", "edge"]

    clock.advance(10)  # 200 clouds' worth, capped at 2
    later = [keeper.decide(f"later{i}", preference=CLOUD_FIRST) for i in range(4)]
    assert sum(clouds(later)) == 2
    assert keeper.stats()["rate_tokens"] == pytest.approx(0)

    clock.advance(0.049)  # 0.98 of a cloud: not yet one
    assert keeper.decide("almost", preference=CLOUD_FIRST).tier == "edge"
    clock.advance(0.001)
    assert keeper.decide("now", preference=CLOUD_FIRST).tier == "cloud"


def test_the_rate_bucket_hands_a_refused_choice_the_tier_it_can_pay_for() -> None:
    clock = FakeClock()
    limits = BudgetLimits(
        FOUR_TIERS, budget_per_request=10, burst=100, rate_per_second=10, rate_burst=10
    )
    keeper = LocalBudgetKeeper(limits, clock=clock)
    ranking = ["huge", "large", "medium"]
    first = keeper.decide("a", preference=ranking)  # the rate bucket starts empty
    assert (first.tier, first.reason) == ("small", "wanted huge: rate budget exhausted")
    clock.advance(0.3)  # 3 units
    assert keeper.decide("b", preference=ranking).tier == "medium"
    clock.advance(0.5)  # 1 + 5
    assert keeper.decide("c", preference=ranking).tier == "large"
    clock.advance(1.0)  # 1 + 10, capped at 10
    assert keeper.decide("d", preference=ranking).tier == "huge"
    assert keeper.stats()["rate_tokens"] == 0


def test_the_reason_names_the_bucket_that_refused_the_first_choice() -> None:
    limits = BudgetLimits(
        FOUR_TIERS, budget_per_request=4, burst=10, rate_per_second=0.001, rate_burst=10
    )
    check_the_reason_names_the_bucket_that_refused_the_first_choice(LocalBudgetKeeper(limits))


def test_exploration_takes_a_cloud_generation_only_when_routed_to_edge() -> None:
    check_exploration_costs_the_extra_tier(
        LocalBudgetKeeper(two_tiers(0.5, 1, exploration_rate=0.5, exploration_burst=1)),
        LocalBudgetKeeper(two_tiers(1, 1, exploration_rate=1, exploration_burst=1)),
    )


def test_exploration_takes_the_extra_cost_of_every_tier_it_adds() -> None:
    check_exploration_over_many_tiers(
        LocalBudgetKeeper(
            BudgetLimits(FOUR_TIERS, budget_per_request=10, burst=20, exploration_rate=1)
        )
    )


def test_exploration_waits_for_a_cloud_generation() -> None:
    keeper = LocalBudgetKeeper(two_tiers(0.25, 1, exploration_rate=1, exploration_burst=1))
    decisions = [keeper.decide(f"x{i}", preference=["edge"], explore=["cloud"]) for i in range(8)]
    assert [bool(d.explored) for d in decisions] == [False, False, False, True] * 2
    assert keeper.stats()["explored"] == 2


def test_concurrent_threads_share_one_bucket() -> None:
    keeper = LocalBudgetKeeper(two_tiers(0.3, 5, exploration_rate=0.05))
    start = threading.Barrier(4)
    logs: list[list[BudgetDecision]] = [[] for _ in range(4)]

    def decide_many(worker: int) -> None:
        start.wait()
        for i in range(2000):
            preference = CLOUD_FIRST if i % 3 else ("edge",)
            decision = keeper.decide(f"w{worker}-{i}", preference=preference, explore=CLOUD_FIRST)
            logs[worker].append(decision)

    threads = [threading.Thread(target=decide_many, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    decisions = sorted((d for log in logs for d in log), key=lambda d: d.sequence or 0)
    assert [d.sequence for d in decisions] == list(range(1, 8001))
    assert worst_window_excess(clouds(decisions), 0.3) <= 5 + TOLERANCE
    assert keeper.stats()["cloud_generations"] == sum(clouds(decisions))
    assert micro(keeper.stats()["spent"]) == 9 * MICRO * sum(clouds(decisions))


@pytest.mark.parametrize("tiers", [2, 6])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_sequence_of_asks_keeps_the_bucket_honest(tiers: int, data: st.DataObject) -> None:
    """Random costs and buckets, random rankings and explorations, repeated request ids
    (redeliveries): every decision follows the rules and the bound B * N + C holds in every
    window of first decisions."""
    keeper = LocalBudgetKeeper(data.draw(pools(tiers)))
    check_the_rules(keeper, data.draw(asks(tiers, ids=30, size=200)))
