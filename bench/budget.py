"""Budget decisions per second for a pool of 2 and of 6 tiers, against a raw Redis round trip.

Router processes (Redis keeper) or threads (local keeper) decide concurrently. Each request
ranks the tiers as a policy would: a first choice drawn at random, then every cheaper tier,
dearest first; and it asks to explore every tier. A Redis decision is one EVALSHA round trip,
so each Redis worker then sends as many PINGs on the same client, at the same concurrency,
in the same run: the floor no decision can go below. The decisions are put back in the order
the buckets saw them (by sequence number) and the table shows the spend per decision (extra
cost above the cheapest tier, explorations included) against B, and the worst excess over
any window of consecutive decisions, ``max(spend - B * length)``, against the bound C.

Run: ``python -m bench.budget [--decisions N] [--workers 1 4] [--tiers 2 6]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from redis import Redis

from workers.services.budget import (
    BudgetKeeper,
    BudgetLimits,
    LocalBudgetKeeper,
    RedisBudgetKeeper,
    worst_window_excess,
)
from workers.settings import Settings

# Both pools spend 0.3 of the dearest tier's extra cost a request, up to 5 of its images.
POOLS = {
    2: BudgetLimits.from_settings(
        Settings(cloud_ratio=0.3, cloud_burst=5.0, exploration_rate=0.05, exploration_burst=2.0)
    ),
    6: BudgetLimits(
        {"xs": 1.0, "s": 1.5, "m": 2.5, "l": 4.0, "xl": 6.0, "xxl": 10.0},
        budget_per_request=2.7,
        burst=45.0,
        exploration_rate=0.05,
        exploration_burst=2.0,
    ),
}


@dataclass
class Run:
    """One worker's decisions: (sequence, spent), and timings; or its PINGs' timings."""

    log: list[tuple[int, float]]
    latencies: list[float]
    began: float
    ended: float


def _decide(keeper: BudgetKeeper, count: int, seed: int, ready: Callable[[], object]) -> Run:
    draw = random.Random(seed)
    limits = keeper.limits
    by_cost = sorted(limits.tier_costs, key=limits.tier_costs.__getitem__, reverse=True)
    run = Run([], [], 0.0, 0.0)
    ready()  # every worker starts together
    run.began = time.perf_counter()
    for _ in range(count):
        preference = by_cost[draw.randrange(len(by_cost)) :]
        sent = time.perf_counter()
        decision = keeper.decide(uuid.uuid4().hex, preference=preference, explore=by_cost)
        run.latencies.append(time.perf_counter() - sent)
        assert decision.sequence is not None, decision.reason
        run.log.append((decision.sequence, decision.spent))
    run.ended = time.perf_counter()
    return run


def _ping(client: Redis, count: int, ready: Callable[[], object]) -> Run:
    run = Run([], [], 0.0, 0.0)
    ready()
    run.began = time.perf_counter()
    for _ in range(count):
        sent = time.perf_counter()
        client.ping()
        run.latencies.append(time.perf_counter() - sent)
    run.ended = time.perf_counter()
    return run


def _redis_worker(
    url: str,
    prefix: str,
    limits: BudgetLimits,
    count: int,
    seed: int,
    start: Barrier,
    out: Queue[tuple[Run, Run]],
) -> None:
    client = Redis.from_url(url)
    keeper = RedisBudgetKeeper(client, limits, key_prefix=prefix)
    keeper.decide(f"warm-{uuid.uuid4().hex}", preference=[limits.cheapest])  # loads the script
    decisions = _decide(keeper, count, seed, start.wait)
    out.put((decisions, _ping(client, count, start.wait)))


def redis_runs(
    url: str, limits: BudgetLimits, workers: int, count: int
) -> tuple[list[Run], list[Run]]:
    context = multiprocessing.get_context("spawn")
    prefix = f"t2iroute-bench:{uuid.uuid4().hex}"
    start = context.Barrier(workers)
    out: Queue[tuple[Run, Run]] = context.Queue()
    processes = [
        context.Process(target=_redis_worker, args=(url, prefix, limits, count, seed, start, out))
        for seed in range(workers)
    ]
    for process in processes:
        process.start()
    results = [out.get() for _ in processes]
    for process in processes:
        process.join()
    RedisBudgetKeeper(Redis.from_url(url), limits, key_prefix=prefix).reset()
    return [decisions for decisions, _ in results], [pings for _, pings in results]


def local_runs(limits: BudgetLimits, workers: int, count: int) -> list[Run]:
    keeper = LocalBudgetKeeper(limits)
    start = threading.Barrier(workers)
    runs: list[Run] = []

    def work(seed: int) -> None:
        runs.append(_decide(keeper, count, seed, start.wait))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs


def _rate(runs: list[Run]) -> float:
    """Calls per second of all workers together, from the first start to the last end."""
    elapsed = max(run.ended for run in runs) - min(run.began for run in runs)
    return sum(len(run.latencies) for run in runs) / elapsed


def row(backend: str, limits: BudgetLimits, workers: int, runs: list[Run], pings: list[Run]) -> str:
    # The Redis workers' warm-up decisions precede all others and are left out of the logs.
    ordered = [spent for _, spent in sorted(entry for run in runs for entry in run.log)]
    latencies = sorted(latency for run in runs for latency in run.latencies)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    if pings:
        ping_rate = _rate(pings)
        ping_p50 = statistics.median(latency for run in pings for latency in run.latencies)
        against = f"{ping_rate:>8,.0f}  {ping_p50 * 1e3:>7.3f}  {_rate(runs) / ping_rate:>8.2f}"
    else:
        against = f"{'-':>8}  {'-':>7}  {'-':>8}"
    return (
        f"{backend:>7}  {len(limits.tier_costs):>5}  {workers:>7}  {_rate(runs):>11,.0f}  "
        f"{statistics.median(latencies) * 1e3:>6.3f}  {p99 * 1e3:>6.3f}  {against}  "
        f"{sum(ordered) / len(ordered):>9.3f}  {limits.budget_per_request:>4.2f}  "
        f"{worst_window_excess(ordered, limits.budget_per_request):>13.3f}  {limits.burst:>5.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=Settings().redis_url, help="Redis holding the buckets")
    parser.add_argument("--decisions", type=int, default=5000, help="per worker")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tiers", type=int, nargs="+", default=sorted(POOLS), choices=POOLS)
    args = parser.parse_args()

    print(
        f"{args.decisions} decisions per worker, first choice at random, every tier explored "
        f"at rate 0.05; Redis at {args.url}"
    )
    print(
        f"{'backend':>7}  {'tiers':>5}  {'workers':>7}  {'decisions/s':>11}  {'p50 ms':>6}  "
        f"{'p99 ms':>6}  {'PINGs/s':>8}  {'PING p50':>7}  {'vs PING':>8}  "
        f"{'spend/req':>9}  {'B':>4}  {'max overshoot':>13}  {'C':>5}"
    )
    for tiers in args.tiers:
        limits = POOLS[tiers]
        for workers in args.workers:
            runs, pings = redis_runs(args.url, limits, workers, args.decisions)
            print(row("redis", limits, workers, runs, pings))
    for tiers in args.tiers:
        limits = POOLS[tiers]
        for workers in args.workers:
            print(row("local", limits, workers, local_runs(limits, workers, args.decisions), []))


if __name__ == "__main__":
    main()
