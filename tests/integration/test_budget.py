"""The budget keeper against the machine's real Redis: its guarantee, its idempotency, and
how it fails. Every test works under its own key prefix and deletes it afterwards."""

from __future__ import annotations

import itertools
import multiprocessing
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from redis.exceptions import RedisError

from tests.budget_scenarios import (
    BOTH,
    CLOUD_FIRST,
    FOUR_TIERS,
    TOLERANCE,
    ask,
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
    BudgetDecision,
    BudgetLimits,
    LocalBudgetKeeper,
    RedisBudgetKeeper,
    budget_keeper_from_settings,
    budget_redis,
    worst_window_excess,
)
from workers.settings import Settings

pytestmark = pytest.mark.integration

REDIS_URL = Settings().redis_url

# Six tiers at uneven prices (extra costs 0.5 to 17.5 over the cheapest) for the processes.
SIX_TIERS = {"xs": 0.5, "s": 1.0, "m": 2.5, "l": 4.0, "xl": 9.0, "xxl": 18.0}
SIX_TIER_LIMITS = BudgetLimits(
    SIX_TIERS, budget_per_request=3.3, burst=40, exploration_rate=0.05, exploration_burst=2
)

Entry = tuple[int, int, float, int]  # sequence, worker, spent, cloud generations


def _redis() -> Redis:
    return Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


@pytest.fixture(scope="module")
def client() -> Iterator[Redis]:
    redis = _redis()
    try:
        redis.ping()
    except RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    yield redis
    redis.close()


def _new_prefix() -> str:
    return f"t2iroute-test:{uuid.uuid4().hex}"


def _drop(client: Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def prefix(client: Redis) -> Iterator[str]:
    name = _new_prefix()
    yield name
    _drop(client, name)


def test_cloud_share_is_bounded_in_every_window(client: Redis, prefix: str) -> None:
    check_every_window_is_bounded(RedisBudgetKeeper(client, two_tiers(0.3, 3), key_prefix=prefix))


def test_burst_accrues_while_nobody_wants_cloud_and_is_capped(client: Redis, prefix: str) -> None:
    check_burst_accrues_and_is_capped(
        RedisBudgetKeeper(client, two_tiers(0.5, 2), key_prefix=prefix)
    )


def test_a_redelivered_request_gets_its_first_decision_and_spends_once(
    client: Redis, prefix: str
) -> None:
    keeper = RedisBudgetKeeper(client, two_tiers(1.0, 5), key_prefix=prefix, marker_ttl_seconds=60)
    check_a_redelivery_keeps_its_first_decision(keeper)
    assert 0 < client.ttl(f"{prefix}:decision:same") <= 60


def test_a_failed_requests_charge_is_given_back_once_within_capacity(
    client: Redis, prefix: str
) -> None:
    keeper = RedisBudgetKeeper(client, two_tiers(1.0, 2), key_prefix=prefix, marker_ttl_seconds=60)
    check_a_refund_gives_the_charge_back_once_within_capacity(keeper)
    assert 0 < client.ttl(f"{prefix}:refund:a") <= 60


def test_a_refund_redis_cannot_take_gives_nothing_back_and_does_not_raise() -> None:
    keeper = budget_keeper_from_settings(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert keeper.refund("nobody-home", ["nobody-home"]) == 0


def test_a_refused_choice_gets_the_best_tier_the_budget_affords(client: Redis, prefix: str) -> None:
    check_a_refused_choice_gets_the_best_affordable_tier(
        RedisBudgetKeeper(
            client, BudgetLimits(FOUR_TIERS, budget_per_request=4, burst=10), key_prefix=prefix
        )
    )


def test_the_reason_names_the_bucket_that_refused_the_first_choice(
    client: Redis, prefix: str
) -> None:
    limits = BudgetLimits(
        FOUR_TIERS, budget_per_request=4, burst=10, rate_per_second=0.001, rate_burst=10
    )
    check_the_reason_names_the_bucket_that_refused_the_first_choice(
        RedisBudgetKeeper(client, limits, key_prefix=prefix)
    )


def test_a_lost_bucket_comes_back_empty(client: Redis, prefix: str) -> None:
    keeper = RedisBudgetKeeper(client, two_tiers(0.5, 4), key_prefix=prefix)
    for i in range(8):
        keeper.decide(f"fill{i}", preference=["edge"])
    assert keeper.stats()["spend_tokens"] == pytest.approx(4 * 9)

    client.delete(f"{prefix}:buckets")  # as after an eviction or a restart without persistence

    after = keeper.decide("after-loss", preference=CLOUD_FIRST)
    assert after.tier == "edge"
    assert after.reason == "wanted cloud: budget exhausted"
    assert after.tokens_left == pytest.approx(0.5 * 9)


def test_the_rate_bucket_caps_cloud_generations_per_second(client: Redis, prefix: str) -> None:
    limits = two_tiers(1.0, 100, cloud_rate_per_second=20, cloud_rate_burst=2)
    keeper = RedisBudgetKeeper(client, limits, key_prefix=prefix)
    started = time.monotonic()
    rush = [keeper.decide(f"rush{i}", preference=CLOUD_FIRST) for i in range(40)]
    elapsed = time.monotonic() - started
    # The rate bucket starts empty, so the rush gets at most what the elapsed time refilled.
    assert sum(clouds(rush)) <= 20 * elapsed + 1
    assert "wanted cloud: rate budget exhausted" in {d.reason for d in rush}

    time.sleep(0.3)  # refills 6 clouds' worth, capped at 2
    after_pause = [keeper.decide(f"later{i}", preference=CLOUD_FIRST) for i in range(6)]
    assert sum(clouds(after_pause)) == 2
    assert keeper.stats()["rate_tokens"] < 9


def test_exploration_takes_a_cloud_generation_only_when_routed_to_edge(
    client: Redis, prefix: str
) -> None:
    check_exploration_costs_the_extra_tier(
        RedisBudgetKeeper(
            client,
            two_tiers(0.5, 1, exploration_rate=0.5, exploration_burst=1),
            key_prefix=prefix,
        ),
        RedisBudgetKeeper(
            client,
            two_tiers(1, 1, exploration_rate=1, exploration_burst=1),
            key_prefix=prefix + ":both",
        ),
    )


def test_exploration_takes_the_extra_cost_of_every_tier_it_adds(client: Redis, prefix: str) -> None:
    check_exploration_over_many_tiers(
        RedisBudgetKeeper(
            client,
            BudgetLimits(FOUR_TIERS, budget_per_request=10, burst=20, exploration_rate=1),
            key_prefix=prefix,
        )
    )


def test_unreachable_redis_gives_the_cheapest_tier_at_once() -> None:
    keeper = budget_keeper_from_settings(Settings(redis_url="redis://127.0.0.1:1/0"))
    started = time.monotonic()
    decision = keeper.decide("nobody-home", preference=CLOUD_FIRST, explore=BOTH)
    assert time.monotonic() - started < 1.0
    assert decision == BudgetDecision(
        tier="edge", explored=(), reason=decision.reason, spent=0.0, tokens_left=None
    )
    assert decision.reason.startswith("budget keeper unavailable: ConnectionError")

    pool = RedisBudgetKeeper(budget_redis("redis://127.0.0.1:1/0", 0.25), SIX_TIER_LIMITS)
    assert pool.decide("nobody-home", preference=["xxl", "s"]).tier == "xs"


def test_a_silent_redis_costs_at_most_the_socket_timeouts() -> None:
    """A server that accepts connections and never answers, as a hung Redis would."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        settings_ = Settings(
            redis_url=f"redis://127.0.0.1:{port}/0", budget_redis_timeout_seconds=0.2
        )
        keeper = budget_keeper_from_settings(settings_)
        started = time.monotonic()
        decision = keeper.decide("hung", preference=CLOUD_FIRST)
        elapsed = time.monotonic() - started
    assert decision.tier == "edge"
    assert decision.reason.startswith("budget keeper unavailable: TimeoutError")
    assert elapsed < 1.0  # two tries of 0.2 s, never an exponential backoff


def _decide_many(
    prefix: str, limits: BudgetLimits, worker: int, count: int, start: Barrier
) -> list[Entry]:
    """``count`` decisions, each ranking some of the dearest tiers (the keeper falls back to
    the cheapest) and exploring up to two tiers."""
    keeper = RedisBudgetKeeper(_redis(), limits, key_prefix=prefix)
    tiers = sorted(limits.tier_costs, key=limits.tier_costs.__getitem__, reverse=True)
    draw = random.Random(worker)
    start.wait()
    log = []
    for i in range(count):
        preference = tiers[: draw.randint(1, len(tiers))]
        explore = draw.sample(tiers, draw.randint(0, 2))
        decision = keeper.decide(f"w{worker}-{i}", preference=preference, explore=explore)
        assert decision.sequence is not None
        log.append((decision.sequence, worker, decision.spent, clouds([decision])[0]))
    return log


def _run_worker(
    prefix: str,
    limits: BudgetLimits,
    worker: int,
    count: int,
    start: Barrier,
    results: Queue[list[Entry]],
) -> None:
    results.put(_decide_many(prefix, limits, worker, count, start))


def _decide_in_processes(
    prefix: str, limits: BudgetLimits, workers: int, count: int
) -> list[Entry]:
    """Every decision of ``workers`` router processes, in the order the buckets saw them."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(workers)
    results: Queue[list[Entry]] = context.Queue()
    processes = [
        context.Process(target=_run_worker, args=(prefix, limits, w, count, start, results))
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    logs = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0

    decisions = sorted(entry for log in logs for entry in log)
    assert [seq for seq, *_ in decisions] == list(range(1, workers * count + 1))
    handovers = sum(a[1] != b[1] for a, b in itertools.pairwise(decisions))
    assert handovers > workers * 10, "the processes did not interleave; the test proves nothing"
    return decisions


@pytest.mark.parametrize(
    ("limits", "tiers"),
    [
        (two_tiers(0.3, 5, exploration_rate=0.05, exploration_burst=2), 2),
        (SIX_TIER_LIMITS, 6),
    ],
    ids=["2 tiers", "6 tiers"],
)
def test_the_bound_holds_across_router_processes(
    client: Redis, prefix: str, limits: BudgetLimits, tiers: int
) -> None:
    assert len(limits.tier_costs) == tiers
    decisions = _decide_in_processes(prefix, limits, workers=4, count=400)

    spends = [micro(spent) for _, _, spent, _ in decisions]
    amounts = limits.micro()
    assert worst_window_excess(spends, amounts.per_request) <= amounts.burst
    stats = RedisBudgetKeeper(client, limits, key_prefix=prefix).stats()
    assert micro(stats["spent"]) == sum(spends)
    assert stats["explored"] > 0
    # Not stingy either: every ranking starts with the dearest tier, which leaves the bucket
    # too low to reach its cap, so all it took in was spent or is still there.
    left = micro(stats["spend_tokens"])
    assert sum(spends) + left == len(decisions) * amounts.per_request
    if tiers == 2:  # in cloud generations, today's bound
        assert worst_window_excess([c for *_, c in decisions], 0.3) <= 5 + TOLERANCE


def test_redeliveries_racing_each_other_spend_once(client: Redis, prefix: str) -> None:
    keeper = RedisBudgetKeeper(client, two_tiers(0.5, 2), key_prefix=prefix)
    start = threading.Barrier(6)
    seen: list[list[BudgetDecision]] = [[] for _ in range(6)]

    def deliver(worker: int) -> None:
        start.wait()
        seen[worker] = [keeper.decide(f"dup{i}", preference=CLOUD_FIRST) for i in range(150)]

    threads = [threading.Thread(target=deliver, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(log == seen[0] for log in seen)
    assert sorted(d.sequence or 0 for d in seen[0]) == list(range(1, 151))
    stats = keeper.stats()
    assert (stats["requests"], stats["cloud_routes"]) == (150, sum(clouds(seen[0])))
    assert stats["spent"] == 9 * sum(clouds(seen[0]))


def test_reset_forgets_buckets_counters_and_markers(client: Redis, prefix: str) -> None:
    keeper = RedisBudgetKeeper(client, two_tiers(1.0, 3), key_prefix=prefix)
    for i in range(3):
        keeper.decide(f"r{i}", preference=["edge"])
    keeper.refund("r0", ["r0"])
    keeper.reset()
    assert list(client.scan_iter(match=f"{prefix}:*")) == []
    again = keeper.decide("r0", preference=CLOUD_FIRST)
    assert (again.sequence, again.tier, again.tokens_left) == (1, "cloud", 0.0)


@pytest.mark.parametrize("tiers", [2, 6])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_the_script_decides_as_the_local_keeper_does(
    client: Redis, tiers: int, data: st.DataObject
) -> None:
    """The Lua script and its Python twin agree on every decision, replays included, so the
    local keeper's unit tests speak for the script too; and the script keeps the rules and
    the bound on Redis."""
    limits = data.draw(pools(tiers))
    requests = data.draw(asks(tiers, ids=40, size=120))
    name = _new_prefix()
    shared = RedisBudgetKeeper(client, limits, key_prefix=name)
    local = LocalBudgetKeeper(limits)
    try:
        on_redis = check_the_rules(shared, requests)
        assert on_redis == check_the_rules(local, requests)
        assert shared.stats() == local.stats()
    finally:
        _drop(client, name)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_the_script_gives_back_as_the_local_keeper_does(client: Redis, data: st.DataObject) -> None:
    """Decisions and refunds interleaved: the Lua script and its Python twin give back the
    same amounts and end with the same buckets."""
    limits = data.draw(pools(3))
    steps = data.draw(st.lists(st.one_of(ask(3, ids=15), st.integers(0, 15)), max_size=80))
    name = _new_prefix()
    keepers = (RedisBudgetKeeper(client, limits, key_prefix=name), LocalBudgetKeeper(limits))
    try:
        outcomes = [
            [
                keeper.refund(f"h{step}", [f"h{step}"])
                if isinstance(step, int)
                else keeper.decide(f"h{step[0]}", preference=step[1], explore=step[2])
                for step in steps
            ]
            for keeper in keepers
        ]
        assert outcomes[0] == outcomes[1]
        shared, local = (keeper.stats() for keeper in keepers)
        assert shared == local
        assert 0 <= shared["spend_tokens"] <= limits.burst
    finally:
        _drop(client, name)
