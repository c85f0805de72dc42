"""Budget decisions per second, and how close the cloud share comes to its bound.

Router processes (Redis keeper) or threads (local keeper) decide concurrently; each request
wants the cloud with probability ``--want``. The decisions are put back in the order the
buckets saw them (by sequence number) and the table shows the cloud share (cloud
generations, explorations included, per decision) against ``rho``, and the worst excess
over any window of consecutive decisions, ``max(cloud - rho * length)``, against the bound,
the burst. A Redis decision is one EVALSHA round trip, so its rate is bounded by Redis's
single thread and the round-trip time, not by Python.

Run: ``python -m bench.budget [--decisions N] [--workers 1 4]``.
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

from workers.budget import (
    BudgetKeeper,
    BudgetLimits,
    LocalBudgetKeeper,
    RedisBudgetKeeper,
    worst_window_excess,
)
from workers.settings import Settings

LIMITS = BudgetLimits(rho=0.3, burst=5.0, exploration_rate=0.05, exploration_burst=2.0)


@dataclass
class Run:
    """One worker's decisions: (sequence, spent a cloud generation), and timings."""

    log: list[tuple[int, bool]]
    latencies: list[float]
    began: float
    ended: float


def _decide(
    keeper: BudgetKeeper, count: int, want: float, seed: int, ready: Callable[[], object]
) -> Run:
    wants = random.Random(seed)
    run = Run([], [], 0.0, 0.0)
    ready()  # every worker starts together
    run.began = time.perf_counter()
    for _ in range(count):
        sent = time.perf_counter()
        decision = keeper.decide(uuid.uuid4().hex, wants_cloud=wants.random() < want)
        run.latencies.append(time.perf_counter() - sent)
        assert decision.sequence is not None, decision.reason
        run.log.append((decision.sequence, decision.cloud or decision.explore))
    run.ended = time.perf_counter()
    return run


def _redis_worker(
    url: str, prefix: str, count: int, want: float, seed: int, start: Barrier, out: Queue[Run]
) -> None:
    keeper = RedisBudgetKeeper(Redis.from_url(url), LIMITS, key_prefix=prefix)
    keeper.decide(f"warm-{uuid.uuid4().hex}", wants_cloud=False)  # loads the script, connects
    out.put(_decide(keeper, count, want, seed, start.wait))


def redis_runs(url: str, workers: int, count: int, want: float) -> list[Run]:
    context = multiprocessing.get_context("spawn")
    prefix = f"t2iroute-bench:{uuid.uuid4().hex}"
    start = context.Barrier(workers)
    out: Queue[Run] = context.Queue()
    processes = [
        context.Process(target=_redis_worker, args=(url, prefix, count, want, seed, start, out))
        for seed in range(workers)
    ]
    for process in processes:
        process.start()
    runs = [out.get() for _ in processes]
    for process in processes:
        process.join()
    RedisBudgetKeeper(Redis.from_url(url), LIMITS, key_prefix=prefix).reset()
    return runs


def local_runs(workers: int, count: int, want: float) -> list[Run]:
    keeper = LocalBudgetKeeper(LIMITS)
    start = threading.Barrier(workers)
    runs: list[Run] = []

    def work(seed: int) -> None:
        runs.append(_decide(keeper, count, want, seed, start.wait))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs


def row(backend: str, workers: int, runs: list[Run]) -> str:
    # The Redis workers' warm-up decisions precede all others and are left out of the logs.
    ordered = [spent for _, spent in sorted(entry for run in runs for entry in run.log)]
    elapsed = max(run.ended for run in runs) - min(run.began for run in runs)
    latencies = sorted(latency for run in runs for latency in run.latencies)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    return (
        f"{backend:>7}  {workers:>7}  {len(latencies) / elapsed:>11,.0f}  "
        f"{statistics.median(latencies) * 1e3:>6.3f}  {p99 * 1e3:>6.3f}  "
        f"{sum(ordered) / len(ordered):>11.4f}  {LIMITS.rho:>4.2f}  "
        f"{worst_window_excess(ordered, LIMITS.rho):>13.3f}  {LIMITS.burst:>5.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=Settings().redis_url, help="Redis holding the buckets")
    parser.add_argument("--decisions", type=int, default=5000, help="per worker")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--want", type=float, default=0.6, help="share of requests wanting cloud")
    args = parser.parse_args()

    print(
        f"{args.decisions} decisions per worker, {args.want:.0%} wanting cloud, "
        f"exploration {LIMITS.exploration_rate}; Redis at {args.url}"
    )
    print(
        f"{'backend':>7}  {'workers':>7}  {'decisions/s':>11}  {'p50 ms':>6}  {'p99 ms':>6}  "
        f"{'cloud share':>11}  {'rho':>4}  {'max overshoot':>13}  {'bound':>5}"
    )
    for workers in args.workers:
        print(row("redis", workers, redis_runs(args.url, workers, args.decisions, args.want)))
    for workers in args.workers:
        print(row("local", workers, local_runs(workers, args.decisions, args.want)))


if __name__ == "__main__":
    main()
