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
    TOLERANCE,
    check_a_redelivery_keeps_its_first_decision,
    check_burst_accrues_and_is_capped,
    check_every_window_is_bounded,
    check_exploration_costs_a_cloud_token,
    spent,
)
from workers.budget import (
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
    ("amount", "micro"),
    [
        (0.3, 300_000),
        (0.7, 700_000),
        (1.0, MICRO),
        (5.0, 5 * MICRO),
        (1e-7, 0),
        (0.1234567, 123_456),
    ],
)
def test_amounts_become_micro_tokens_rounded_down(amount: float, micro: int) -> None:
    assert _micro(amount) == micro


def test_glob_characters_in_a_prefix_match_only_themselves() -> None:
    assert _escape_glob("a*b?[c]\\d") == "a\\*b\\?\\[c\\]\\\\d"


@pytest.mark.parametrize(
    ("spent", "rho", "excess"),
    [
        ([], 0.5, 0.0),
        ([False, False], 0.5, 0.0),
        ([True, True, True], 0.5, 1.5),
        ([True, False, False, False, True, True], 0.25, 1.5),  # the last two, not all six
    ],
)
def test_worst_window_excess_finds_the_worst_window(
    spent: list[bool], rho: float, excess: float
) -> None:
    assert worst_window_excess(spent, rho) == pytest.approx(excess)


@pytest.mark.parametrize(
    "bad",
    [
        {"rho": 1.5, "burst": 2.0},
        {"rho": -0.1, "burst": 2.0},
        {"rho": 0.3, "burst": 0.5},
        {"rho": 0.3, "burst": 2.0, "rate_per_second": 0.0},
        {"rho": 0.3, "burst": 2.0, "rate_burst": 0.5},
        {"rho": 0.3, "burst": 2.0, "exploration_rate": 1.1},
        {"rho": 0.3, "burst": 2.0, "exploration_burst": 0.9},
    ],
)
def test_impossible_buckets_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BudgetLimits(**bad)


def test_markers_must_live_at_least_a_second() -> None:
    limits = BudgetLimits(rho=0.3, burst=2.0)
    with pytest.raises(ValueError):
        LocalBudgetKeeper(limits, marker_ttl_seconds=0)
    with pytest.raises(ValueError):  # building a client connects to nothing
        RedisBudgetKeeper(Redis(), limits, marker_ttl_seconds=0)


@pytest.mark.parametrize(
    "keeper",
    [
        LocalBudgetKeeper(BudgetLimits(rho=0.3, burst=2.0)),
        RedisBudgetKeeper(Redis(), BudgetLimits(rho=0.3, burst=2.0)),
    ],
    ids=["local", "redis"],
)
def test_a_decision_needs_a_request_id(keeper: BudgetKeeper) -> None:
    with pytest.raises(ValueError):
        keeper.decide("", wants_cloud=True)


def test_the_settings_pick_the_keeper() -> None:
    local = budget_keeper_from_settings(Settings(budget_backend="local", cloud_ratio=0.2))
    shared = BudgetKeeper.from_settings(Settings(budget_backend="redis", cloud_burst=3.0))
    assert isinstance(local, LocalBudgetKeeper)
    assert local.limits.rho == 0.2
    assert isinstance(shared, RedisBudgetKeeper)
    assert shared.limits.burst == 3.0


def test_cloud_share_is_bounded_and_every_whole_token_is_served() -> None:
    check_every_window_is_bounded(LocalBudgetKeeper(BudgetLimits(rho=0.3, burst=3)))


def test_burst_accrues_while_nobody_wants_cloud_and_is_capped() -> None:
    check_burst_accrues_and_is_capped(LocalBudgetKeeper(BudgetLimits(rho=0.5, burst=2)))


def test_a_redelivered_request_gets_its_first_decision_and_spends_once() -> None:
    clock = FakeClock()
    keeper = LocalBudgetKeeper(BudgetLimits(rho=1.0, burst=5), marker_ttl_seconds=60, clock=clock)
    check_a_redelivery_keeps_its_first_decision(keeper, lambda: clock.advance(59))

    clock.advance(1)  # the marker has expired: the request is decided anew
    assert keeper.decide("same", wants_cloud=False).sequence == 2


def test_reset_brings_the_buckets_back_empty() -> None:
    keeper = LocalBudgetKeeper(BudgetLimits(rho=0.5, burst=4))
    for i in range(8):
        keeper.decide(f"fill{i}", wants_cloud=False)
    assert keeper.stats()["ratio_tokens"] == pytest.approx(4.0)

    keeper.reset()

    after = keeper.decide("fill0", wants_cloud=True)  # its marker went too
    assert not after.cloud
    assert after.reason == "ratio budget exhausted"
    assert after.tokens_left == pytest.approx(0.5)
    assert after.sequence == 1


def test_the_rate_bucket_limits_cloud_routes_per_second() -> None:
    clock = FakeClock()
    keeper = LocalBudgetKeeper(
        BudgetLimits(rho=1.0, burst=100, rate_per_second=20, rate_burst=2), clock=clock
    )
    first = keeper.decide("first", wants_cloud=True)
    assert (first.cloud, first.reason) == (False, "rate budget exhausted")  # starts empty

    clock.advance(0.1)  # two tokens
    rush = [keeper.decide(f"rush{i}", wants_cloud=True) for i in range(4)]
    assert [d.cloud for d in rush] == [True, True, False, False]

    clock.advance(10)  # 200 tokens' worth, capped at 2
    later = [keeper.decide(f"later{i}", wants_cloud=True) for i in range(4)]
    assert sum(d.cloud for d in later) == 2
    assert keeper.stats()["rate_tokens"] == pytest.approx(0)

    clock.advance(0.049)  # 0.98 of a token: not yet one
    assert not keeper.decide("almost", wants_cloud=True).cloud
    clock.advance(0.001)
    assert keeper.decide("now", wants_cloud=True).cloud


def test_exploration_takes_a_cloud_token_only_when_routed_to_edge() -> None:
    check_exploration_costs_a_cloud_token(
        LocalBudgetKeeper(
            BudgetLimits(rho=0.5, burst=1, exploration_rate=0.5, exploration_burst=1)
        ),
        LocalBudgetKeeper(BudgetLimits(rho=1, burst=1, exploration_rate=1, exploration_burst=1)),
    )


def test_exploration_waits_for_a_cloud_token() -> None:
    keeper = LocalBudgetKeeper(
        BudgetLimits(rho=0.25, burst=1, exploration_rate=1, exploration_burst=1)
    )
    decisions = [keeper.decide(f"x{i}", wants_cloud=False) for i in range(8)]
    assert [d.explore for d in decisions] == [False, False, False, True] * 2
    assert keeper.stats()["explore"] == 2


def test_concurrent_threads_share_one_bucket() -> None:
    keeper = LocalBudgetKeeper(BudgetLimits(rho=0.3, burst=5, exploration_rate=0.05))
    start = threading.Barrier(4)
    logs: list[list[BudgetDecision]] = [[] for _ in range(4)]

    def decide_many(worker: int) -> None:
        start.wait()
        for i in range(2000):
            logs[worker].append(keeper.decide(f"w{worker}-{i}", wants_cloud=i % 3 != 0))

    threads = [threading.Thread(target=decide_many, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    decisions = sorted((d for log in logs for d in log), key=lambda d: d.sequence or 0)
    assert [d.sequence for d in decisions] == list(range(1, 8001))
    assert worst_window_excess([spent(d) for d in decisions], 0.3) <= 5 + TOLERANCE
    assert keeper.stats()["cloud_generations"] == sum(spent(d) for d in decisions)


@settings(max_examples=200, deadline=None)
@given(
    rho=st.floats(0.0, 1.0),
    burst=st.floats(1.0, 8.0),
    exploration_rate=st.floats(0.0, 0.5),
    requests=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=200),
)
def test_any_sequence_of_wants_keeps_the_bucket_honest(
    rho: float, burst: float, exploration_rate: float, requests: list[tuple[int, bool]]
) -> None:
    """Request ids repeat (redeliveries): a replay returns the first decision and spends
    nothing, and over the first decisions the bound holds in every window."""
    keeper = LocalBudgetKeeper(
        BudgetLimits(rho=rho, burst=burst, exploration_rate=exploration_rate)
    )
    first: dict[int, BudgetDecision] = {}
    tokens = 0.0
    for request, wanted in requests:
        decision = keeper.decide(f"h{request}", wants_cloud=wanted)
        if request in first:
            assert decision == first[request]
            continue
        first[request] = decision
        assert decision.tokens_left is not None
        available = min(burst, tokens + rho)
        assert decision.cloud <= wanted
        if wanted and not decision.cloud:
            assert available < 1 + TOLERANCE
        tokens = decision.tokens_left
        assert tokens == pytest.approx(available - spent(decision), abs=2 * TOLERANCE)
        assert -TOLERANCE <= tokens <= burst

    decisions = sorted(first.values(), key=lambda d: d.sequence or 0)
    assert [d.sequence for d in decisions] == list(range(1, len(first) + 1))
    assert worst_window_excess([spent(d) for d in decisions], rho) <= burst + TOLERANCE
    assert keeper.stats()["cloud_generations"] == sum(spent(d) for d in decisions)
