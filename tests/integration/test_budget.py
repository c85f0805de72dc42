"""The budget keeper against the machine's real Redis: its guarantee, its idempotency, and
how it fails. Every test works under its own key prefix and deletes it afterwards."""

from __future__ import annotations

import itertools
import multiprocessing
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
    TOLERANCE,
    check_a_redelivery_keeps_its_first_decision,
    check_burst_accrues_and_is_capped,
    check_every_window_is_bounded,
    check_exploration_costs_a_cloud_token,
    spent,
)
from workers.budget import (
    BudgetDecision,
    BudgetLimits,
    LocalBudgetKeeper,
    RedisBudgetKeeper,
    budget_keeper_from_settings,
    worst_window_excess,
)
from workers.settings import Settings

pytestmark = pytest.mark.integration

REDIS_URL = Settings().redis_url

Entry = tuple[int, int, bool, bool]  # sequence, worker, cloud, explore


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
    check_every_window_is_bounded(
        RedisBudgetKeeper(client, BudgetLimits(rho=0.3, burst=3), key_prefix=prefix)
    )


def test_burst_accrues_while_nobody_wants_cloud_and_is_capped(client: Redis, prefix: str) -> None:
    check_burst_accrues_and_is_capped(
        RedisBudgetKeeper(client, BudgetLimits(rho=0.5, burst=2), key_prefix=prefix)
    )


def test_a_redelivered_request_gets_its_first_decision_and_spends_once(
    client: Redis, prefix: str
) -> None:
    keeper = RedisBudgetKeeper(
        client, BudgetLimits(rho=1.0, burst=5), key_prefix=prefix, marker_ttl_seconds=60
    )
    check_a_redelivery_keeps_its_first_decision(keeper)
    assert 0 < client.ttl(f"{prefix}:request:same") <= 60


def test_a_lost_bucket_comes_back_empty(client: Redis, prefix: str) -> None:
    keeper = RedisBudgetKeeper(client, BudgetLimits(rho=0.5, burst=4), key_prefix=prefix)
    for i in range(8):
        keeper.decide(f"fill{i}", wants_cloud=False)
    assert keeper.stats()["ratio_tokens"] == pytest.approx(4.0)

    client.delete(f"{prefix}:buckets")  # as after an eviction or a restart without persistence

    after = keeper.decide("after-loss", wants_cloud=True)
    assert not after.cloud
    assert after.reason == "ratio budget exhausted"
    assert after.tokens_left == pytest.approx(0.5)


def test_the_rate_bucket_limits_cloud_routes_per_second(client: Redis, prefix: str) -> None:
    keeper = RedisBudgetKeeper(
        client,
        BudgetLimits(rho=1.0, burst=100, rate_per_second=20, rate_burst=2),
        key_prefix=prefix,
    )
    started = time.monotonic()
    rush = [keeper.decide(f"rush{i}", wants_cloud=True) for i in range(40)]
    elapsed = time.monotonic() - started
    # The rate bucket starts empty, so the rush gets at most what the elapsed time refilled.
    assert sum(d.cloud for d in rush) <= 20 * elapsed + 1
    assert "rate budget exhausted" in {d.reason for d in rush}

    time.sleep(0.3)  # refills 6 tokens, capped at 2
    after_pause = [keeper.decide(f"later{i}", wants_cloud=True) for i in range(6)]
    assert sum(d.cloud for d in after_pause) == 2
    assert keeper.stats()["rate_tokens"] < 1


def test_exploration_takes_a_cloud_token_only_when_routed_to_edge(
    client: Redis, prefix: str
) -> None:
    check_exploration_costs_a_cloud_token(
        RedisBudgetKeeper(
            client,
            BudgetLimits(rho=0.5, burst=1, exploration_rate=0.5, exploration_burst=1),
            key_prefix=prefix,
        ),
        RedisBudgetKeeper(
            client,
            BudgetLimits(rho=1, burst=1, exploration_rate=1, exploration_burst=1),
            key_prefix=prefix + ":both",
        ),
    )


def test_unreachable_redis_routes_to_edge_at_once() -> None:
    keeper = budget_keeper_from_settings(Settings(redis_url="redis://127.0.0.1:1/0"))
    started = time.monotonic()
    decision = keeper.decide("nobody-home", wants_cloud=True)
    assert time.monotonic() - started < 1.0
    assert decision == BudgetDecision(
        cloud=False, explore=False, reason=decision.reason, tokens_left=None
    )
    assert decision.reason.startswith("budget keeper unavailable: ConnectionError")


def test_a_silent_redis_costs_at_most_the_socket_timeouts() -> None:
    """A server that accepts connections and never answers, as a hung Redis would."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        settings_ = Settings(
            redis_url=f"redis://127.0.0.1:{port}/0", budget_redis_timeout_seconds=0.2
        )
        keeper = budget_keeper_from_settings(settings_)
        started = time.monotonic()
        decision = keeper.decide("hung", wants_cloud=True)
        elapsed = time.monotonic() - started
    assert not decision.cloud
    assert decision.reason.startswith("budget keeper unavailable: TimeoutError")
    assert elapsed < 1.0  # two tries of 0.2 s, never an exponential backoff


def _decide_many(prefix: str, worker: int, count: int, start: Barrier) -> list[Entry]:
    keeper = RedisBudgetKeeper(
        _redis(),
        BudgetLimits(rho=0.3, burst=5, exploration_rate=0.05, exploration_burst=2),
        key_prefix=prefix,
    )
    start.wait()
    log = []
    for i in range(count):
        decision = keeper.decide(f"w{worker}-{i}", wants_cloud=True)
        assert decision.sequence is not None
        log.append((decision.sequence, worker, decision.cloud, decision.explore))
    return log


def _run_worker(
    prefix: str, worker: int, count: int, start: Barrier, results: Queue[list[Entry]]
) -> None:
    results.put(_decide_many(prefix, worker, count, start))


def test_the_bound_holds_across_router_processes(prefix: str) -> None:
    workers, per_worker = 4, 500
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(workers)
    results: Queue[list[Entry]] = context.Queue()
    processes = [
        context.Process(target=_run_worker, args=(prefix, w, per_worker, start, results))
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    logs = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0

    decisions = sorted(entry for log in logs for entry in log)
    assert [seq for seq, *_ in decisions] == list(range(1, workers * per_worker + 1))
    handovers = sum(a[1] != b[1] for a, b in itertools.pairwise(decisions))
    assert handovers > workers * 10, "the processes did not interleave; the test proves nothing"

    cost = [cloud or explore for _, _, cloud, explore in decisions]
    assert worst_window_excess(cost, 0.3) <= 5 + TOLERANCE
    assert sum(cost) == workers * per_worker * 3 // 10  # and every whole token was spent
    assert sum(explore for *_, explore in decisions) > 0


def test_redeliveries_racing_each_other_spend_once(client: Redis, prefix: str) -> None:
    keeper = RedisBudgetKeeper(client, BudgetLimits(rho=0.5, burst=2), key_prefix=prefix)
    start = threading.Barrier(6)
    seen: list[list[BudgetDecision]] = [[] for _ in range(6)]

    def deliver(worker: int) -> None:
        start.wait()
        seen[worker] = [keeper.decide(f"dup{i}", wants_cloud=True) for i in range(150)]

    threads = [threading.Thread(target=deliver, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(log == seen[0] for log in seen)
    assert sorted(d.sequence or 0 for d in seen[0]) == list(range(1, 151))
    stats = keeper.stats()
    assert (stats["requests"], stats["cloud"]) == (150, sum(d.cloud for d in seen[0]))


def test_reset_forgets_buckets_counters_and_markers(client: Redis, prefix: str) -> None:
    keeper = RedisBudgetKeeper(client, BudgetLimits(rho=1.0, burst=3), key_prefix=prefix)
    for i in range(3):
        keeper.decide(f"r{i}", wants_cloud=False)
    keeper.reset()
    assert list(client.scan_iter(match=f"{prefix}:*")) == []
    again = keeper.decide("r0", wants_cloud=True)
    assert (again.sequence, again.cloud, again.tokens_left) == (1, True, 0.0)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rho=st.floats(0.0, 1.0),
    burst=st.floats(1.0, 8.0),
    exploration_rate=st.floats(0.0, 0.5),
    requests=st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=120),
)
def test_the_script_decides_as_the_local_keeper_does(
    client: Redis,
    rho: float,
    burst: float,
    exploration_rate: float,
    requests: list[tuple[int, bool]],
) -> None:
    """The Lua script and its Python twin agree on every decision, replays included, so the
    local keeper's unit tests speak for the script too; and the bound holds on Redis."""
    limits = BudgetLimits(rho=rho, burst=burst, exploration_rate=exploration_rate)
    name = _new_prefix()
    shared = RedisBudgetKeeper(client, limits, key_prefix=name)
    local = LocalBudgetKeeper(limits)
    try:
        pairs = [
            (shared.decide(f"h{i}", wants_cloud=w), local.decide(f"h{i}", wants_cloud=w))
            for i, w in requests
        ]
        assert shared.stats() == local.stats()
    finally:
        _drop(client, name)

    assert [redis_side for redis_side, _ in pairs] == [local_side for _, local_side in pairs]
    firsts = sorted({d.sequence: d for d, _ in pairs}.values(), key=lambda d: d.sequence or 0)
    assert worst_window_excess([spent(d) for d in firsts], rho) <= burst + TOLERANCE
