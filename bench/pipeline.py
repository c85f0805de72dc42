"""Throughput of the whole pipeline on tiny models, beside the floors it cannot beat: the same
Celery hand-offs with no work in them, and the same model work in one process with no
hand-offs. The pipeline's overhead is the part of its wall time that neither floor explains.

Everything runs on a private Redis and PostgreSQL (``tests/fault/servers.py``) on free
loopback ports, never on the machine's shared servers; the bench kills only the processes it
started. PostgreSQL loads pg_stat_statements, and every kind of process logs in as a role of
its own (the bench submitting, the route+quality worker, each tier's worker, the maintenance
worker, the bench's own polling), so each statement is counted against who ran it.

1. Whole pipeline: ``--requests`` requests through the README's server layout (a
   ``route,quality`` worker, a solo worker per tier, a maintenance worker and beat), after a
   few warm-up requests that load every model. Beside it: (a) a no-op chain of the same shape
   (route -> generate on each tier the run generated -> score, every hand-off a message) on
   the same broker, configuration and worker layout; (b) the models alone in this process:
   the run's generations and CLIP scores, one at a time.
2. The route stage alone: ``--route-messages`` route messages for requests submitted before
   the router worker started, sent at once (throughput), then ``--paced-messages`` at
   ``--paced-rate`` a second (latency below capacity), unbatched and batched, beside no-op
   tasks on a worker with the same pool.
3. CLIP scoring and generation, batched and one at a time, in this process.
4. Statements and transactions per request of the run of table 1.
5. Growth: per-request time and statements at each ``--growth`` size, each on a fresh
   database.

Micro-batching and torch threads are the workers' settings (``T2IROUTE_*_BATCH_SIZE``,
``T2IROUTE_*_BATCH_WAIT_MS``, ``T2IROUTE_TORCH_THREADS``), passed to every worker; code that
does not read them ignores them. ``OMP_NUM_THREADS`` carries the torch threads too, so that
code which sets no threads of its own runs with the same number.

Run: ``python -m bench.pipeline [--quick] [--requests 200] [--no-batch] [--torch-threads 1]
[--out reports/bench_pipeline]``. Rows go to CSV files and ``summary.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import psycopg
import torch
from celery import Celery
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from redis import Redis
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as transformers_logging

from db.session import get_engine
from routing.quality import ContrastiveQualityScorer
from tests.fault.servers import PostgresServer, RedisServer
from tests.fault.stack import Process
from workers.app.celery_app import app as celery_app
from workers.app.celery_app import celery_config
from workers.app.flow import ROUTE, task_id
from workers.app.names import TASK_ROUTE
from workers.entrypoints.demo import demo_prompts
from workers.offline.tiny_models import make_tiny
from workers.services.pipelines import generate, load_clip, load_pipeline
from workers.services.producer import submit
from workers.settings import Settings, get_settings

REPOSITORY = Path(__file__).resolve().parents[1]
DATABASE = "t2iroute"
TEMPLATE = "t2iroute_template"
ROLE_PREFIX = "bench_"
# Every kind of process logs in as its own role; the observer is this bench polling.
ROLES = ("producer", "router", "edge", "cloud", "maintenance", "observer")
PIPELINE_ROLES = ("producer", "router", "edge", "cloud")
ROLE_LABELS = {
    "producer": "producer (submit)",
    "router": "route+quality worker",
    "edge": "edge worker",
    "cloud": "cloud worker",
    "maintenance": "maintenance worker (sweeps)",
}

# Micro-batch sizes (route, quality, generate) for --batch and --no-batch, and the waits.
BATCHED = (32, 32, 8)
UNBATCHED = (1, 1, 1)
BATCH_WAIT_MS = {"ROUTE": "20", "QUALITY": "50", "GENERATE": "50"}

# Production's reliability settings, not the fault suite's short ones: a sweep every 30 s.
WORKER_ENV = {
    "T2IROUTE_TASK_TIME_LIMIT": "600",
    "T2IROUTE_TASK_SOFT_TIME_LIMIT": "540",
    "T2IROUTE_VISIBILITY_TIMEOUT": "3600",
    "T2IROUTE_SWEEP_INTERVAL_SECONDS": "30",
    "T2IROUTE_LOST_AFTER_SECONDS": "60",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

WARM_UP_REQUESTS = 6
WARM_UP_ROUNDS = 5
WARM_UP_ROUTES = 5

NOOP_WORKER = "noop-worker"
NOOP_ROUTE = "t2iroute_bench.route"
NOOP_GENERATE = "t2iroute_bench.generate"
NOOP_SCORE = "t2iroute_bench.score"
NOOP_FLOOR = "t2iroute_bench.floor"
DONE_KEY = "t2iroute_bench:done"


@dataclass(frozen=True)
class Slot:
    """One worker process of the README's layout; ``name`` is also its database role."""

    name: str
    queues: str
    pool: str
    by_tier: bool = False

    def command(self) -> list[str]:
        what = f"--tiers={self.queues}" if self.by_tier else f"--queues={self.queues}"
        return [
            *(
                sys.executable,
                "-m",
                "workers.entrypoints.cli.main",
                "worker",
                what,
                f"--pool={self.pool}",
            ),
            *(f"--hostname={self.name}@bench", "--loglevel=INFO"),
        ]

    def noop_command(self) -> list[str]:
        """The same process on the no-op app: a tier's worker takes the tier's queue."""
        return [
            *(sys.executable, "-m", "bench.pipeline", NOOP_WORKER, f"--queues={self.queues}"),
            *(f"--pool={self.pool}", "--concurrency=1", f"--hostname=noop-{self.name}@bench"),
            "--loglevel=INFO",
        ]


# README, "Running it on servers" (the default pool: a tier's queue is its name).
LAYOUT = (
    Slot("router", "route,quality", "prefork"),
    Slot("edge", "edge", "solo", by_tier=True),
    Slot("cloud", "cloud", "solo", by_tier=True),
    Slot("maintenance", "maintenance", "prefork"),
)
ROUTER = LAYOUT[0]


def python_path() -> str:
    """This checkout first, for every process the bench starts: the no-op workers import
    this module, which is not installed, and the workers run the code this bench came with."""
    return os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))


# --- servers and processes -------------------------------------------------------------------


class Cluster:
    """The private Redis and PostgreSQL of one bench run, a migrated template database that
    each measured run copies, and the tiny models."""

    def __init__(self, root: Path, threads: int) -> None:
        self.root = root
        self.threads = threads
        self.redis = RedisServer(root / "redis", appendonly=False)
        self.postgres = PostgresServer.initialise(
            prefix="t2iroute-bench-pg-",
            server_settings={"shared_preload_libraries": "pg_stat_statements"},
        )
        self.models = make_tiny(root / "models")

    def start(self) -> None:
        self.redis.start()
        self.postgres.start()
        with self.postgres.connect("postgres") as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
            for role in ROLES:
                conn.execute(f"CREATE ROLE {ROLE_PREFIX}{role} LOGIN SUPERUSER")
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        subprocess.run(
            [sys.executable, "-m", "workers.entrypoints.cli.main", "migrate"],
            check=True,
            capture_output=True,
            env={
                **os.environ,
                "PYTHONPATH": python_path(),
                "T2IROUTE_DATABASE_URL": self.url("observer", TEMPLATE),
            },
        )

    def close(self) -> None:
        self.redis.stop()
        self.postgres.remove()

    def url(self, role: str, database: str = DATABASE, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{ROLE_PREFIX}{role}@127.0.0.1:{self.postgres.port}/{database}"

    def fresh_state(self) -> None:
        """An empty migrated database and empty Redis databases (broker and budget)."""
        with self.postgres.connect("postgres") as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DATABASE} TEMPLATE {TEMPLATE}")
        client = self.redis.client()
        client.flushall()
        client.close()

    def observe(self, database: str = DATABASE) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.url("observer", database, "postgresql"), autocommit=True)

    def environment(self, folder: Path, role: str, batched: bool) -> dict[str, str]:
        """What a process of a run sees: the caller's environment less its T2IROUTE_
        variables, then this run's servers, models, torch threads and batching."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
        sizes = BATCHED if batched else UNBATCHED
        threads = str(self.threads)
        return {
            **inherited,
            **WORKER_ENV,
            "PYTHONPATH": python_path(),
            "T2IROUTE_DATABASE_URL": self.url(role),
            "T2IROUTE_BROKER_URL": self.redis.url(0),
            "T2IROUTE_REDIS_URL": self.redis.url(1),
            "T2IROUTE_IMAGE_STORE": str(folder / "images"),
            "T2IROUTE_MODEL_STORE": str(folder / "routers"),
            "T2IROUTE_EDGE_MODEL": str(self.models["edge"]),
            "T2IROUTE_CLOUD_MODEL": str(self.models["cloud"]),
            "T2IROUTE_CLIP_MODEL": str(self.models["clip"]),
            "T2IROUTE_TORCH_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            **{
                f"T2IROUTE_{stage}_BATCH_SIZE": str(size)
                for stage, size in zip(BATCH_WAIT_MS, sizes, strict=True)
            },
            **{f"T2IROUTE_{stage}_BATCH_WAIT_MS": wait for stage, wait in BATCH_WAIT_MS.items()},
        }

    def settings(self, folder: Path, role: str, batched: bool) -> Settings:
        """The settings a process of the run reads, for this process to act as one of them."""
        fields = {
            key.removeprefix("T2IROUTE_").lower(): value
            for key, value in self.environment(folder, role, batched).items()
            if key.startswith("T2IROUTE_")
        }
        return Settings.model_validate(fields)


class Deployment:
    """The processes of one run, logging into its folder. ``close`` kills them and the pool
    children of a prefork worker (``tests.fault.stack.Process``), and nothing else."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[Process] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        process = Process(name, argv, env, self.folder)
        self.processes.append(process)
        process.start()

    def wait_ready(self, timeout: float = 300.0) -> None:
        workers = [p for p in self.processes if p.name != "beat"]
        self.wait(lambda: all(" ready." in p.text() for p in workers), timeout, "workers ready")

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition``; a process that exits or a timeout ends the bench with the logs."""
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [p.name for p in self.processes if not p.alive]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} ({p.log})\n{p.tail(3000)}" for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            if process.alive:
                process.kill()


@contextmanager
def deployed(folder: Path) -> Iterator[Deployment]:
    folder.mkdir(parents=True, exist_ok=True)
    deployment = Deployment(folder)
    try:
        yield deployment
    finally:
        deployment.close()


def start_layout(deployment: Deployment, cluster: Cluster, batched: bool) -> None:
    for slot in LAYOUT:
        env = cluster.environment(deployment.folder, slot.name, batched)
        deployment.start(slot.name, slot.command(), env)
    # Beat only sends the sweeps; the maintenance worker runs them under its own role.
    env = cluster.environment(deployment.folder, "maintenance", batched)
    deployment.start("beat", [sys.executable, "-m", "workers.entrypoints.cli.main", "beat"], env)
    deployment.wait_ready()


def use_broker(settings: Settings) -> None:
    """Point the workers' Celery app in this process, through which the producer sends, at
    the run's broker."""
    celery_app.conf.update(celery_config(settings))


# --- the no-op app ---------------------------------------------------------------------------


def noop_app(settings: Settings) -> Celery:
    """An app with the workers' own Celery configuration whose tasks only hand on: a chain
    route -> generate on each tier -> score, every hand-off a message, and a single no-op
    task. The last task of each records its end in Redis (one RPUSH). Its workers import
    ``workers.app.celery_app`` (for the configuration), so the workers' signal handlers run
    around these tasks too."""
    app = Celery("t2iroute_bench")
    app.conf.update(celery_config(settings))
    recorder = Redis.from_url(settings.redis_url)
    queues = settings.queues

    def record(index: int) -> None:
        recorder.rpush(DONE_KEY, f"{index} {time.time()}")

    @app.task(name=NOOP_ROUTE)
    def route(index: int, tiers: list[str]) -> None:
        for tier in tiers:
            app.send_task(NOOP_GENERATE, args=[index, tier], queue=queues[tier])

    @app.task(name=NOOP_GENERATE)
    def generate_image(index: int, tier: str) -> None:
        app.send_task(NOOP_SCORE, args=[index, tier], queue=queues["quality"])

    @app.task(name=NOOP_SCORE)
    def score(index: int, tier: str) -> None:
        record(index)

    @app.task(name=NOOP_FLOOR)
    def floor(index: int) -> None:
        record(index)

    return app


def recorded_ends(client: Redis) -> dict[int, float]:
    """The last recorded end of each index."""
    ends: dict[int, float] = {}
    for entry in cast(list[bytes], client.lrange(DONE_KEY, 0, -1)):
        index, at = entry.decode().split()
        ends[int(index)] = max(ends.get(int(index), 0.0), float(at))
    return ends


# --- measuring -------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile; NaN of nothing."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def prompts(count: int, offset: int = 0) -> list[tuple[str, int]]:
    """(prompt, seed) pairs: the demo's prompts in turn, seed = position."""
    texts = demo_prompts(None)
    return [(texts[i % len(texts)], i) for i in range(offset, offset + count)]


def submit_all(settings: Settings, work: Sequence[tuple[str, int]]) -> list[str]:
    return [submit(text, seed=seed, settings=settings).request_id for text, seed in work]


def count(conn: psycopg.Connection[tuple[Any, ...]], query: str, *params: object) -> int:
    row = conn.execute(query, params).fetchone()
    return int(row[0]) if row else 0


FINAL_COUNT = (
    "SELECT count(*) FROM generation_requests WHERE id = ANY(%s) AND status IN ('done', 'failed')"
)
OPEN_STEPS = "SELECT count(*) FROM dispatches WHERE status IN ('pending', 'running')"


def serve(deployment: Deployment, cluster: Cluster, ids: list[str]) -> None:
    """Until every request is final and every step closed (an exploration's other tier may
    still be scored after its request is done)."""
    timeout = 120.0 + 3.0 * len(ids)
    with cluster.observe() as conn:
        deployment.wait(lambda: count(conn, FINAL_COUNT, ids) == len(ids), timeout, "final")
        deployment.wait(lambda: count(conn, OPEN_STEPS) == 0, 120.0, "every step closed")


@dataclass(frozen=True)
class Job:
    """One generation the pipeline made, as the models alone redo it."""

    tier: str
    prompt: str
    seed: int
    width: int
    height: int
    steps: int | None
    guidance_scale: float | None


@dataclass(frozen=True)
class StatementCount:
    role: str
    kind: str
    table: str
    calls: int
    query: str


@dataclass
class PipelineRun:
    requests: int
    wall_s: float
    latencies_s: list[float]
    statuses: dict[str, int]
    jobs: list[Job]
    scores: int
    shapes: list[list[str]]
    statements: list[StatementCount]
    commits: int

    @property
    def generations(self) -> Counter[str]:
        return Counter(job.tier for job in self.jobs)

    def calls(self, roles: Sequence[str] = PIPELINE_ROLES, kinds: Sequence[str] = ()) -> int:
        return sum(
            s.calls
            for s in self.statements
            if s.role in roles and (s.kind in kinds if kinds else s.kind not in TRANSACTION)
        )


def run_pipeline(
    cluster: Cluster, args: argparse.Namespace, requests: int, folder: Path
) -> PipelineRun:
    """The whole pipeline on a fresh database, after warm-up requests that load every
    worker's models; statements are counted from the first measured submit."""
    cluster.fresh_state()
    settings = cluster.settings(folder, "producer", args.batch)
    use_broker(settings)
    with deployed(folder) as deployment:
        start_layout(deployment, cluster, args.batch)
        warm_up(deployment, cluster, settings)
        baseline = reset_statements(cluster)
        ids = submit_all(settings, prompts(requests))
        serve(deployment, cluster, ids)
        with cluster.observe() as conn:
            run = read_run(conn, ids)
    get_engine(settings.database_url).dispose()
    run.statements, run.commits = read_statements(cluster, baseline)
    return run


def warm_up(deployment: Deployment, cluster: Cluster, settings: Settings) -> None:
    """A few requests at a time until every tier's image has been scored, so that every
    worker has loaded its models before the measured requests (or give up after a few)."""
    tiers = set(settings.pool.names)
    scored: set[str] = set()
    for attempt in range(WARM_UP_ROUNDS):
        work = prompts(WARM_UP_REQUESTS, 10_000 + attempt * WARM_UP_REQUESTS)
        serve(deployment, cluster, submit_all(settings, work))
        with cluster.observe() as conn:
            scored = {str(tier) for (tier,) in conn.execute("SELECT tier FROM quality_scores")}
        if tiers <= scored:
            return
    progress(f"warm-up: no image of {', '.join(sorted(tiers - scored))} yet; measuring anyway")


def read_run(conn: psycopg.Connection[tuple[Any, ...]], ids: list[str]) -> PipelineRun:
    statuses = dict(
        conn.execute(
            "SELECT status, count(*) FROM generation_requests WHERE id = ANY(%s) GROUP BY status",
            (ids,),
        ).fetchall()
    )
    latencies = [
        float(row[0])
        for row in conn.execute(
            "SELECT extract(epoch FROM updated_at - created_at) FROM generation_requests "
            "WHERE id = ANY(%s) AND status = 'done'",
            (ids,),
        )
    ]
    wall = conn.execute(
        "SELECT extract(epoch FROM max(updated_at) - min(created_at)) FROM generation_requests "
        "WHERE id = ANY(%s)",
        (ids,),
    ).fetchone()
    jobs = [
        Job(*row)
        for row in conn.execute(
            "SELECT g.tier, r.prompt, r.seed, r.width, r.height, r.steps, r.guidance_scale "
            "FROM generations g JOIN generation_requests r ON r.id = g.request_id "
            "WHERE r.id = ANY(%s) ORDER BY r.created_at, g.id",
            (ids,),
        )
    ]
    shapes = [
        [tier, *explored]
        for tier, explored in conn.execute(
            "SELECT d.tier, d.explored FROM routing_decisions d "
            "JOIN generation_requests r ON r.id = d.request_id "
            "WHERE r.id = ANY(%s) ORDER BY r.created_at",
            (ids,),
        )
    ]
    return PipelineRun(
        requests=len(ids),
        wall_s=float(wall[0]) if wall else float("nan"),
        latencies_s=latencies,
        statuses={str(k): int(v) for k, v in statuses.items()},
        jobs=jobs,
        scores=count(conn, "SELECT count(*) FROM quality_scores WHERE request_id = ANY(%s)", ids),
        shapes=shapes,
        statements=[],
        commits=0,
    )


TRANSACTION = ("BEGIN", "COMMIT", "ROLLBACK")
KINDS = ("SELECT", "INSERT", "UPDATE", "DELETE", *TRANSACTION)
TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)


def classify(query: str) -> tuple[str, str]:
    """A statement's kind (its first word, or ``other``) and its first table, or ``-``."""
    words = query.split(None, 1)
    kind = words[0].upper() if words else "other"
    match = TABLE.search(query)
    return (kind if kind in KINDS else "other"), (match.group(1) if match else "-")


def xact_commits(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    return count(conn, "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", DATABASE)


def reset_statements(cluster: Cluster) -> int:
    """Empty pg_stat_statements; the bench database's committed transactions so far."""
    with cluster.observe("postgres") as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        return xact_commits(conn)


def read_statements(cluster: Cluster, baseline: int) -> tuple[list[StatementCount], int]:
    """Statements per role, kind and table since the reset, and the committed transactions
    of the bench database less the bench's own polls (each its own transaction). Called
    once the run's processes are gone: a backend's counters reach pg_stat_database at the
    latest when it exits."""
    time.sleep(1.0)
    with cluster.observe("postgres") as conn:
        rows = conn.execute(
            "SELECT r.rolname, s.query, s.calls FROM pg_stat_statements s "
            "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = %s",
            (DATABASE,),
        ).fetchall()
        committed = xact_commits(conn) - baseline
    statements = [
        StatementCount(
            str(role).removeprefix(ROLE_PREFIX), *classify(str(query)), int(calls), query
        )
        for role, query, calls in rows
    ]
    polls = sum(s.calls for s in statements if s.role == "observer")
    kept = [s for s in statements if s.role != "observer"]
    return sorted(kept, key=lambda s: (s.role, -s.calls)), committed - polls


@dataclass
class ChainRun:
    chains: int
    wall_s: float
    latencies_s: list[float]


def run_noop_chain(
    cluster: Cluster, args: argparse.Namespace, shapes: list[list[str]], folder: Path
) -> ChainRun:
    """One no-op chain per request of the pipeline run, with its tiers, on the same layout
    (beat left out: it would only send sweeps nobody here knows)."""
    cluster.fresh_state()
    settings = cluster.settings(folder, "producer", args.batch)
    app = noop_app(settings)
    recorder = cluster.redis.client(1)
    expected = sum(len(tiers) for tiers in shapes)

    def send(index: int, tiers: list[str]) -> None:
        app.send_task(NOOP_ROUTE, args=[index, tiers], queue=settings.queue_route)

    with deployed(folder) as deployment:
        for slot in LAYOUT:
            env = cluster.environment(folder, slot.name, args.batch)
            deployment.start(f"noop-{slot.name}", slot.noop_command(), env)
        deployment.wait_ready()
        for index in range(WARM_UP_ROUTES):
            send(index, shapes[index % len(shapes)])
        warm = sum(len(shapes[index % len(shapes)]) for index in range(WARM_UP_ROUTES))
        deployment.wait(lambda: recorder.llen(DONE_KEY) >= warm, 60.0, "no-op warm-up")
        recorder.delete(DONE_KEY)
        sent = []
        for index, tiers in enumerate(shapes):
            sent.append(time.time())
            send(index, tiers)
        timeout = 60.0 + len(shapes)
        deployment.wait(lambda: recorder.llen(DONE_KEY) >= expected, timeout, "no-op chains")
        ends = recorded_ends(recorder)
    recorder.close()
    latencies = [ends[i] - sent[i] for i in range(len(shapes))]
    return ChainRun(len(shapes), max(ends.values()) - sent[0], latencies)


@dataclass
class StageRun:
    """One stage's throughput on a burst of messages and its latency at a paced rate."""

    label: str
    burst: int
    burst_s: float
    burst_latencies_s: list[float]
    paced_rate: float
    paced_latencies_s: list[float]

    @property
    def rate(self) -> float:
        return self.burst / self.burst_s


def measure_stage(
    label: str,
    deployment: Deployment,
    args: argparse.Namespace,
    send: Callable[[int], None],
    completed: Callable[[], int],
    ends: Callable[[], dict[int, float]],
) -> StageRun:
    """Warm-up messages, then a burst (all sent at once: throughput), then paced ones
    (latency below capacity). ``send(i)`` sends message ``i``; ``ends()`` maps each message
    to its end on the wall clock."""
    warm = range(WARM_UP_ROUTES)
    burst = range(warm.stop, warm.stop + args.route_messages)
    paced = range(burst.stop, burst.stop + args.paced_messages)
    for index in warm:
        send(index)
    deployment.wait(lambda: completed() >= warm.stop, 120.0, f"{label}: warm-up")
    sent: dict[int, float] = {}
    for index in burst:
        sent[index] = time.time()
        send(index)
    deployment.wait(lambda: completed() >= burst.stop, 60.0 + len(burst), f"{label}: burst")
    began = time.monotonic()
    for step, index in enumerate(paced):
        time.sleep(max(0.0, began + step / args.paced_rate - time.monotonic()))
        sent[index] = time.time()
        send(index)
    deployment.wait(lambda: completed() >= paced.stop, 60.0 + len(paced), f"{label}: paced")
    end = ends()
    return StageRun(
        label=label,
        burst=len(burst),
        burst_s=max(end[i] for i in burst) - sent[burst.start],
        burst_latencies_s=[end[i] - sent[i] for i in burst],
        paced_rate=args.paced_rate,
        paced_latencies_s=[end[i] - sent[i] for i in paced],
    )


def run_route_stage(
    cluster: Cluster, args: argparse.Namespace, batched: bool, folder: Path
) -> StageRun:
    """Route messages for requests submitted before the router worker started (their first
    messages are dropped from the queue, then sent again as the bench measures), with only
    the route+quality worker running: the generation steps just queue up. A decision's end
    is ``routing_decisions.created_at``, the start of its transaction."""
    cluster.fresh_state()
    settings = cluster.settings(folder, "producer", batched)
    use_broker(settings)
    total = WARM_UP_ROUTES + args.route_messages + args.paced_messages
    ids = submit_all(settings, prompts(total))
    broker = cluster.redis.client(0)
    broker.delete(settings.queue_route)
    broker.close()
    get_engine(settings.database_url).dispose()
    position = {request_id: index for index, request_id in enumerate(ids)}

    def send(index: int) -> None:
        request_id = ids[index]
        celery_app.send_task(
            TASK_ROUTE, args=ROUTE.args(request_id), task_id=task_id(ROUTE, request_id, 1)
        )

    with deployed(folder) as deployment, cluster.observe() as conn:
        deployment.start(
            ROUTER.name, ROUTER.command(), cluster.environment(folder, "router", batched)
        )
        deployment.wait_ready()

        def decided() -> int:
            return count(conn, "SELECT count(*) FROM routing_decisions")

        def ends() -> dict[int, float]:
            rows = conn.execute(
                "SELECT request_id, extract(epoch FROM created_at) FROM routing_decisions"
            )
            return {position[str(rid)]: float(at) for rid, at in rows}

        label = "route, batched" if batched else "route, unbatched"
        return measure_stage(label, deployment, args, send, decided, ends)


def run_floor(cluster: Cluster, args: argparse.Namespace, folder: Path) -> StageRun:
    """No-op tasks through the same broker, on the router worker's pool and concurrency."""
    cluster.fresh_state()
    settings = cluster.settings(folder, "producer", args.batch)
    app = noop_app(settings)
    recorder = cluster.redis.client(1)
    with deployed(folder) as deployment:
        env = cluster.environment(folder, ROUTER.name, args.batch)
        deployment.start("noop-router", ROUTER.noop_command(), env)
        deployment.wait_ready()
        run = measure_stage(
            "no-op task (floor)",
            deployment,
            args,
            lambda index: app.send_task(NOOP_FLOOR, args=[index], queue=settings.queue_route),
            lambda: int(recorder.llen(DONE_KEY)),
            lambda: recorded_ends(recorder),
        )
    recorder.close()
    return run


# --- the models in this process --------------------------------------------------------------


@dataclass
class Models:
    """The tiny pipelines and the CLIP scorer, loaded through the workers' own code."""

    pipes: dict[str, Any]
    scorer: ContrastiveQualityScorer
    settings: Settings

    @classmethod
    def load(cls, settings: Settings) -> Models:
        pipes = {tier.name: load_pipeline(tier.model) for tier in settings.pool}
        clip, processor = load_clip(settings.clip_model)
        return cls(pipes, ContrastiveQualityScorer(clip, processor), settings)

    def render(self, job: Job) -> Image.Image:
        """As the generation task renders it: the request's parameters, else the tier's."""
        spec = self.settings.pool[job.tier]
        return generate(
            self.pipes[job.tier],
            job.prompt,
            width=job.width,
            height=job.height,
            steps=job.steps or spec.steps or self.settings.default_steps,
            seed=job.seed,
            guidance_scale=spec.guidance_scale
            if job.guidance_scale is None
            else job.guidance_scale,
        )

    def render_batch(self, tier: str, jobs: Sequence[Job]) -> list[Image.Image]:
        """One diffusers call for jobs that share their parameters: a list of prompts and a
        generator per seed, so each image is the one its seed gives alone."""
        spec = self.settings.pool[tier]
        first = jobs[0]
        pipe = self.pipes[tier]
        extra = {} if spec.guidance_scale is None else {"guidance_scale": spec.guidance_scale}
        result = cast(Callable[..., Any], pipe)(
            [job.prompt for job in jobs],
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps or spec.steps or self.settings.default_steps,
            generator=[torch.Generator(device=pipe.device).manual_seed(j.seed) for j in jobs],
            output_type="pil",
            **extra,
        )
        return list(result.images)


@dataclass
class AloneRun:
    generation_s: dict[str, float]
    generations: Counter[str]
    scoring_s: float
    scores: int

    @property
    def seconds(self) -> float:
        return sum(self.generation_s.values()) + self.scoring_s


def models_alone(models: Models, jobs: Sequence[Job], scores: int) -> AloneRun:
    """The run's generations, then as many CLIP scores of their images, one at a time, after
    one warm-up call of each model."""
    for tier in {job.tier for job in jobs}:
        models.render(next(job for job in jobs if job.tier == tier))
    generation_s: dict[str, float] = defaultdict(float)
    images = []
    for job in jobs:
        started = time.perf_counter()
        images.append(models.render(job))
        generation_s[job.tier] += time.perf_counter() - started
    models.scorer.score(images[:1])
    started = time.perf_counter()
    for image in images[:scores]:
        models.scorer.score([image])
    scoring_s = time.perf_counter() - started
    return AloneRun(dict(generation_s), Counter(job.tier for job in jobs), scoring_s, scores)


@dataclass(frozen=True)
class BatchRow:
    model: str
    batch: int
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def bench_batching(models: Models, images: int, repeats: int) -> list[BatchRow]:
    """Images a second one at a time and in batches, for each tier's generation (batch of
    8) and CLIP scoring (8 and 32); the best of ``repeats`` timings after a warm-up."""
    settings = models.settings
    jobs = [
        Job(tier, text, seed, settings.default_width, settings.default_height, None, None)
        for tier in models.pipes
        for text, seed in prompts(images)
    ]
    rows = []
    pictures: list[Image.Image] = []
    for tier in models.pipes:
        own = [job for job in jobs if job.tier == tier]
        single = best_of(repeats, partial(render_each, models, own))
        rows.append(BatchRow(f"generate {tier}", 1, len(own), single))
        batches = [own[i : i + 8] for i in range(0, len(own), 8)]
        batched = best_of(repeats, partial(render_batches, models, tier, batches))
        rows.append(BatchRow(f"generate {tier}", 8, len(own), batched))
        pictures += render_each(models, own)
    pictures = (pictures * (1 + 4 * images // len(pictures)))[: 4 * images]
    for size in (1, 8, 32):
        chunks = [pictures[i : i + size] for i in range(0, len(pictures), size)]
        seconds = best_of(repeats, partial(score_chunks, models.scorer, chunks))
        rows.append(BatchRow("CLIP scores", size, len(pictures), seconds))
    return rows


def render_each(models: Models, jobs: Sequence[Job]) -> list[Image.Image]:
    return [models.render(job) for job in jobs]


def render_batches(models: Models, tier: str, batches: Sequence[Sequence[Job]]) -> None:
    for batch in batches:
        models.render_batch(tier, batch)


def score_chunks(scorer: ContrastiveQualityScorer, chunks: Sequence[list[Image.Image]]) -> None:
    for chunk in chunks:
        scorer.score(chunk)


def best_of(repeats: int, run: Callable[[], object]) -> float:
    run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


# --- reports ---------------------------------------------------------------------------------


@dataclass
class Report:
    """One printed table and its CSV file: raw values in the rows, formatted on printing."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def print(self, console: Console) -> None:
        table = Table(title=self.title, title_justify="left")
        for position, column in enumerate(self.columns):
            table.add_column(column, justify="left" if position == 0 else "right")
        for row in self.rows:
            table.add_row(*(cell(value) for value in row))
        console.print(table)
        for note in self.notes:
            console.print(f"  {note}", highlight=False)
        console.print()

    def write(self, out: Path) -> None:
        with (out / f"{self.name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            writer.writerows(self.rows)

    def as_dict(self) -> dict[str, Any]:
        rows = [dict(zip(self.columns, row, strict=True)) for row in self.rows]
        return {"title": self.title, "rows": rows, "notes": self.notes}


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def pipeline_report(
    run: PipelineRun, chain: ChainRun, alone: AloneRun, args: argparse.Namespace
) -> Report:
    tiers = sorted(run.generations)
    report = Report(
        "pipeline",
        f"1. Whole pipeline, {run.requests} requests, README layout, "
        f"{'batched' if args.batch else 'unbatched'}, torch threads {args.torch_threads}",
        [
            "run",
            "wall s",
            "requests/s",
            "p50 ms",
            "p99 ms",
            "done",
            "failed",
            *(f"images {tier}" for tier in tiers),
            "CLIP scores",
        ],
    )
    images = [run.generations[tier] for tier in tiers]
    report.rows = [
        [
            "pipeline",
            run.wall_s,
            run.requests / run.wall_s,
            ms(quantile(run.latencies_s, 0.5)),
            ms(quantile(run.latencies_s, 0.99)),
            run.statuses.get("done", 0),
            run.statuses.get("failed", 0),
            *images,
            run.scores,
        ],
        [
            "(a) no-op chain, same layout",
            chain.wall_s,
            chain.chains / chain.wall_s,
            ms(quantile(chain.latencies_s, 0.5)),
            ms(quantile(chain.latencies_s, 0.99)),
            None,
            None,
            *images,
            None,
        ],
        [
            "(b) models alone, 1 process",
            alone.seconds,
            run.requests / alone.seconds,
            None,
            None,
            None,
            None,
            *(alone.generations[tier] for tier in tiers),
            alone.scores,
        ],
    ]
    ratio = run.wall_s / (alone.seconds + chain.wall_s)
    split = ", ".join(f"{tier} {alone.generation_s[tier]:.2f} s" for tier in tiers)
    report.notes = [
        "latency: generation_requests.created_at to updated_at of done; wall: first submit "
        "to last request final (both the database's clock)",
        f"models alone: {split}, CLIP {alone.scoring_s:.2f} s",
        f"goal: pipeline wall / (models alone + no-op chain) = {run.wall_s:.1f} / "
        f"({alone.seconds:.1f} + {chain.wall_s:.1f}) = {ratio:.2f} (goal <= 1.3: "
        f"{'met' if ratio <= 1.3 else 'not met'})",
    ]
    return report


def route_report(floor: StageRun, runs: list[StageRun], args: argparse.Namespace) -> Report:
    report = Report(
        "route_stage",
        f"2. Route stage alone, {args.route_messages} messages at once, then "
        f"{args.paced_messages} at {args.paced_rate:g}/s",
        [
            "run",
            "decisions/s",
            "x floor",
            "burst p50 ms",
            "burst p99 ms",
            "paced p50 ms",
            "paced p99 ms",
        ],
    )
    for run in [floor, *runs]:
        report.rows.append(
            [
                run.label,
                run.rate,
                run.rate / floor.rate,
                ms(quantile(run.burst_latencies_s, 0.5)),
                ms(quantile(run.burst_latencies_s, 0.99)),
                ms(quantile(run.paced_latencies_s, 0.5)),
                ms(quantile(run.paced_latencies_s, 0.99)),
            ]
        )
    batched = next(run for run in runs if run.label.endswith(", batched"))
    p99 = ms(quantile(batched.paced_latencies_s, 0.99))
    report.notes = [
        "latency: routing_decisions.created_at (start of the decision's transaction) minus "
        "the time this bench sent the route message; the floor's end is its task's end",
        "decisions/s: burst messages over first send to last decision",
        f"goal, batched: >= 2x the floor: {batched.rate / floor.rate:.2f}x "
        f"({'met' if batched.rate >= 2 * floor.rate else 'not met'}); paced p99 < 50 ms: "
        f"{p99:.1f} ms ({'met' if p99 < 50 else 'not met'})",
    ]
    return report


def batching_report(rows: list[BatchRow], threads: int) -> Report:
    report = Report(
        "batching",
        f"3. Batched vs one at a time, in one process, tiny models, torch threads {threads}",
        ["model", "batch", "images", "images/s", "x one at a time"],
    )
    single = {row.model: row.rate for row in rows if row.batch == 1}
    report.rows = [
        [row.model, row.batch, row.images, row.rate, row.rate / single[row.model]] for row in rows
    ]
    report.notes = ["generation: one diffusers call, a list of prompts and a generator per seed"]
    return report


def per_request(run: PipelineRun, roles: Sequence[str], kind: str) -> float:
    return run.calls(roles, [kind]) / run.requests


STATEMENT_KINDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "other")


def statements_report(run: PipelineRun) -> Report:
    report = Report(
        "statements",
        f"4. Statements and transactions per request ({run.requests} requests of table 1)",
        ["who", *STATEMENT_KINDS, "statements", "BEGIN", "COMMIT", "ROLLBACK"],
    )
    groups = [([role], ROLE_LABELS[role]) for role in PIPELINE_ROLES]
    groups.append((list(PIPELINE_ROLES), "pipeline (all of the above)"))
    groups.append((["maintenance"], ROLE_LABELS["maintenance"]))
    for roles, label in groups:
        report.rows.append(
            [
                label,
                *(per_request(run, roles, kind) for kind in STATEMENT_KINDS),
                run.calls(roles) / run.requests,
                *(per_request(run, roles, kind) for kind in TRANSACTION),
            ]
        )
    untracked = run.commits - run.calls(ROLES, ["COMMIT"])
    report.notes = [
        "pg_stat_statements calls / requests, each process logging in as its own role; "
        "warm-up, migrations and the bench's polling are not counted",
        f"pg_stat_database xact_commit of the bench database, less the bench's polls: "
        f"{run.commits / run.requests:.2f} per request (maintenance included), of which "
        f"{untracked / run.requests:.2f} with no recorded statement: chiefly SQLAlchemy's "
        "pool_pre_ping, an empty query (';') at every checkout, which pg_stat_statements skips",
        "every statement's text and calls: statements_by_query.csv",
    ]
    return report


def queries_report(run: PipelineRun) -> Report:
    """Every recorded statement of the run (written, not printed)."""
    report = Report(
        "statements_by_query",
        "Statements of the run of table 1, by role and text",
        ["role", "kind", "table", "calls", "per request", "query"],
    )
    report.rows = [
        [s.role, s.kind, s.table, s.calls, s.calls / run.requests, " ".join(s.query.split())]
        for s in run.statements
    ]
    return report


def tables_report(run: PipelineRun) -> Report:
    report = Report(
        "statements_by_table",
        "4b. Pipeline statements per request, by table (first table named)",
        ["table", *STATEMENT_KINDS, "all"],
    )
    by_table: dict[str, Counter[str]] = defaultdict(Counter)
    for statement in run.statements:
        if statement.role in PIPELINE_ROLES and statement.kind not in TRANSACTION:
            by_table[statement.table][statement.kind] += statement.calls
    for table, kinds in sorted(by_table.items(), key=lambda item: -item[1].total()):
        report.rows.append(
            [
                table,
                *(kinds[kind] / run.requests for kind in STATEMENT_KINDS),
                kinds.total() / run.requests,
            ]
        )
    return report


def growth_report(runs: list[PipelineRun], args: argparse.Namespace) -> Report:
    report = Report(
        "growth",
        f"5. Growth, whole pipeline, each on a fresh database "
        f"({'batched' if args.batch else 'unbatched'})",
        [
            "requests",
            "wall s",
            "ms/request",
            "p50 ms",
            "p99 ms",
            "statements/request",
            "commits/request",
            "done",
            "failed",
        ],
    )
    for run in runs:
        report.rows.append(
            [
                run.requests,
                run.wall_s,
                ms(run.wall_s / run.requests),
                ms(quantile(run.latencies_s, 0.5)),
                ms(quantile(run.latencies_s, 0.99)),
                run.calls() / run.requests,
                run.calls(kinds=["COMMIT"]) / run.requests,
                run.statuses.get("done", 0),
                run.statuses.get("failed", 0),
            ]
        )
    report.notes = ["statements and commits: the pipeline's roles (maintenance left out)"]
    return report


# --- main ------------------------------------------------------------------------------------

FULL = {"requests": 200, "route_messages": 1000, "paced_messages": 200, "growth": "50,200,800"}
QUICK = {"requests": 40, "route_messages": 200, "paced_messages": 50, "growth": "20,40"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes")
    parser.add_argument("--requests", type=int, help="requests of table 1 (default 200)")
    parser.add_argument("--route-messages", type=int, help="route messages at once (1000)")
    parser.add_argument("--paced-messages", type=int, help="route messages paced (200)")
    parser.add_argument("--paced-rate", type=float, default=20.0, help="paced messages a second")
    parser.add_argument("--growth", help="request counts of table 5 (default 50,200,800)")
    parser.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="micro-batch sizes route/quality/generate 32/32/8 (--no-batch: 1/1/1)",
    )
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker process")
    parser.add_argument("--out", type=Path, default=Path("reports/bench_pipeline"))
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.growth = [int(size) for size in str(args.growth).split(",") if size.strip()]
    args.images = 8 if args.quick else 16
    args.repeats = 1 if args.quick else 3
    return args


def git_revision() -> str:
    result = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quiet_model_libraries() -> None:
    """Model libraries' notices and progress bars in this process, which would bury the
    tables (the workers get the same through WORKER_ENV)."""
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_model_libraries()
    console = Console() if sys.stdout.isatty() else Console(width=160)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "revision": git_revision(),
        "cores": len(os.sched_getaffinity(0)),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "reports": {},
    }
    reports: list[Report] = []

    def show(report: Report) -> None:
        report.print(console)
        report.write(args.out)
        reports.append(report)
        summary["reports"][report.name] = report.as_dict()
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    root = Path(tempfile.mkdtemp(prefix="t2iroute-bench-"))
    torch.set_num_threads(args.torch_threads)
    progress(f"building tiny models and private servers under {root}")
    cluster = Cluster(root, args.torch_threads)
    try:
        cluster.start()
        progress(f"1. pipeline, {args.requests} requests")
        pipeline = run_pipeline(cluster, args, args.requests, root / "pipeline")
        progress("1a. no-op chain")
        chain = run_noop_chain(cluster, args, pipeline.shapes, root / "noop-chain")
        progress("1b. models alone")
        models = Models.load(cluster.settings(root, "producer", args.batch))
        alone = models_alone(models, pipeline.jobs, pipeline.scores)
        show(pipeline_report(pipeline, chain, alone, args))

        progress(f"2. route stage, {args.route_messages} + {args.paced_messages} messages")
        floor = run_floor(cluster, args, root / "floor")
        stages = [
            run_route_stage(cluster, args, batched, root / f"route-{batched}")
            for batched in (False, True)
        ]
        show(route_report(floor, stages, args))

        progress("3. batching in one process")
        show(batching_report(bench_batching(models, args.images, args.repeats), args.torch_threads))

        show(statements_report(pipeline))
        queries_report(pipeline).write(args.out)
        show(tables_report(pipeline))

        growth = []
        for size in args.growth:
            if size == args.requests:
                growth.append(pipeline)
                continue
            progress(f"5. growth, {size} requests")
            growth.append(run_pipeline(cluster, args, size, root / f"growth-{size}"))
        show(growth_report(growth, args))
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    console.print(
        f"2 cores shared with other work: figures are noisy. Revision {summary['revision']}; "
        f"rows in {args.out}/",
        highlight=False,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == [NOOP_WORKER]:
        # A worker of the no-op app, started by this bench with the run's environment.
        noop_app(get_settings()).worker_main(["worker", *sys.argv[2:]])
    else:
        main()
