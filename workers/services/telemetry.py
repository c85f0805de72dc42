"""Prometheus metrics: every series t2iroute exports, and where each one is read.

Two kinds of series, from two places.

* Events are counted where they happen, in the process that does the work: routing decisions
  by outcome, the route stage's latency, generations and their latency per tier, quality
  scores per tier and metric, retries after an outage, failed attempts and steps given up by
  stage and reason, the sweeper's re-sends, callback deliveries. Every worker exports them on
  its own port (``t2iroute worker --metrics-port``, ``T2IROUTE_METRICS_PORT``); the API
  exports its own (requests accepted and refused) on ``/metrics``.
* State is read from Postgres and Redis at scrape time by collectors: requests in flight and
  the states of the recent ones, tier health, the router version and its trade-off, the
  budget keeper's buckets and counters, queue lengths. Every process shares it, so only the
  API registers these collectors: one target reports it once, and a sum over targets stays
  right.

Why multiprocess mode in the workers. A Celery prefork worker runs its tasks in child
processes that it forks and replaces (a child past ``worker_max_memory_per_child``, or killed
at the hard time limit): a counter in a child's memory would die with it, and a port per child
would move with every replacement. prometheus-client's multiprocess mode keeps each process's
values in memory-mapped files in one folder (``PROMETHEUS_MULTIPROC_DIR``, which it reads when
it is first imported, so ``t2iroute worker`` sets it before that); the worker's main process
serves the folder on one port, summing every child's files, an exited child's included, so a
counter never goes back. Each worker has a folder of its own, emptied when it starts (a pid of
an earlier run may come back). The solo and threads pools use the same mode, so one code path
serves every pool. Worker series are counters and histograms only, which sum across processes
as they are; ``mark_process_dead`` still runs as a child exits, as prometheus-client asks.

Label values are bounded: tiers are names of the pool (a message for an unknown tier is
dropped before any of this, workers/engine/runner.py), quality metrics are ``routing.metrics``'s
names, and every reason and outcome is bucketed into a fixed set here. The scrape-time
queries are bounded too: requests in flight are read through the partial index of unfinished
steps (bounded by the backlog, not the history), and the recent requests are those of the last
``metrics_window`` decisions, by primary key.

Events are counted as the work is written, inside its transaction: a transaction that an
outage rolls back, and that a retry repeats, may count twice. They are rates to watch; the
database is the record.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, get_args

import redis
import redis.exceptions
import sqlalchemy.exc
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from db import queries
from db.models import Status
from db.session import session_scope
from workers.services.budget import BudgetKeeper, BudgetLimits, budget_keeper_from_settings
from workers.services.images import StoreUnavailable
from workers.settings import Settings, get_settings

if TYPE_CHECKING:
    from workers.app.flow import Send, Step

log = logging.getLogger(__name__)

__all__ = [
    "ACCEPTED",
    "REFUSED",
    "api_exposition",
    "decision_timer",
    "exported_series",
    "observe_generations",
    "observe_quality",
    "process_exited",
    "record_callback",
    "record_decisions",
    "record_failure",
    "record_give_up",
    "record_retry",
    "record_store_outage",
    "record_sweep",
    "serve_worker_metrics",
]

#: What the budget keeper said of a decision's first choice (``BudgetDecision.reason``).
DecisionOutcome = Literal[
    "granted", "budget_exhausted", "rate_exhausted", "keeper_unavailable", "other"
]
#: The outage a delivery was retried for (workers/engine/runner.py ``TRANSIENT_ERRORS``).
Outage = Literal["database", "redis", "broker", "connection", "store"]
#: Why an attempt at a step failed.
FailureReason = Literal["time_limit", "out_of_memory", "io", "error"]
#: Why a step gave up: its attempts failed, workers died holding it, its messages were lost.
GiveUpReason = Literal["failed_attempts", "worker_died", "messages_lost"]
#: What became of one attempt to deliver a callback: the receiver answered 2xx; it answered
#: otherwise; it could not be reached (connection error or timeout); the last attempt failed
#: and delivery stopped; the callback was delivered before (a redelivered task); its API key
#: had every slot taken, so it waits without an attempt (workers/services/callback_slots.py).
CallbackOutcome = Literal[
    "delivered", "rejected", "unreachable", "gave_up", "duplicate", "deferred"
]

# --- events: counted in the process that does the work -------------------------------------
#
# Worker series belong to no registry: in multiprocess mode the worker's exporter reads every
# process's files, whatever registry a metric is in, and the API's registry must not repeat
# them as zeros.

DECISIONS = Counter(
    "t2iroute_decisions",
    "Routing decisions, by the tier that answers, the tier the policy wanted first, and what "
    "the budget keeper said of that first choice",
    ["tier", "wanted", "outcome"],
    registry=None,
)
EXPLORATIONS = Counter(
    "t2iroute_explorations",
    "Tiers a request is generated on beside its answer, for labelled pairs",
    ["tier"],
    registry=None,
)
DECISION_SECONDS = Histogram(
    "t2iroute_decision_seconds",
    "The route stage per request: the batch's forward pass, calibration, budget decisions "
    "and writes, as long as the request waited for them",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=None,
)
GENERATION_SECONDS = Histogram(
    "t2iroute_generation_seconds",
    "Generation per image written: the diffusers call that made it, by tier",
    ["tier"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0),
    registry=None,
)
QUALITY = Histogram(
    "t2iroute_quality_score",
    "Contrastive quality scores (0 to 1) of generated images, by tier and metric",
    ["tier", "metric"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    registry=None,
)
RETRIES = Counter(
    "t2iroute_retries",
    "Deliveries that met a database, Redis, broker or image store outage (sent again with "
    "backoff, or left to the sweeper once the retries are spent), by stage and outage",
    ["stage", "tier", "reason"],
    registry=None,
)
STORE_OUTAGES = Counter(
    "t2iroute_image_store_outages",
    "Images the image store could not take (full, quota, read_only, denied): an outage, "
    "retried without counting an attempt or a tier failure",
    ["reason"],
    registry=None,
)
FAILURES = Counter(
    "t2iroute_step_failures",
    "Failed attempts at a step (the stage raised), by stage and reason",
    ["stage", "tier", "reason"],
    registry=None,
)
GIVE_UPS = Counter(
    "t2iroute_steps_given_up",
    "Steps that gave up (an exploration tier is dropped, an answer's tier rerouted, or the "
    "request failed), by stage and reason",
    ["stage", "tier", "reason"],
    registry=None,
)
RESENDS = Counter(
    "t2iroute_sweeper_resends",
    "Steps the sweeper sent again because their message was lost",
    ["stage", "tier"],
    registry=None,
)
CALLBACKS = Counter(
    "t2iroute_callbacks",
    "Callback deliveries, by outcome: attempts, duplicates and waits for a key's slot",
    ["outcome"],
    registry=None,
)

# The API's own events, in the default registry that its /metrics serves. Labelled, so that
# a worker that imports this module writes no zero of them into its multiprocess folder.
ACCEPTED = Counter(
    "t2iroute_requests_accepted",
    "Requests accepted by the HTTP API; created is false for a repeated idempotency key",
    ["created"],
)
REFUSED = Counter(
    "t2iroute_requests_refused",
    "Requests the HTTP API answered with a problem (RFC 9457), by status",
    ["status"],
)

WORKER_METRICS: tuple[Counter | Histogram, ...] = (
    DECISIONS,
    EXPLORATIONS,
    DECISION_SECONDS,
    GENERATION_SECONDS,
    QUALITY,
    RETRIES,
    STORE_OUTAGES,
    FAILURES,
    GIVE_UPS,
    RESENDS,
    CALLBACKS,
)
API_METRICS: tuple[Counter, ...] = (ACCEPTED, REFUSED)


def decision_outcome(reason: str) -> DecisionOutcome:
    """A ``BudgetDecision.reason`` bucketed (workers/services/budget.py writes them): ``granted``,
    ``wanted T: budget exhausted``, ``wanted T: rate budget exhausted``, ``budget keeper
    unavailable: ...``."""
    if reason == "granted":
        return "granted"
    if reason.startswith("budget keeper unavailable"):
        return "keeper_unavailable"
    if reason.endswith(": rate budget exhausted"):
        return "rate_exhausted"
    if reason.endswith(": budget exhausted"):
        return "budget_exhausted"
    return "other"


def record_decisions(rows: Iterable[Mapping[str, Any]]) -> None:
    """Count the routing decisions a batch writes (``routing_decisions`` rows)."""
    for row in rows:
        outcome = decision_outcome(row["budget_reason"])
        DECISIONS.labels(tier=row["tier"], wanted=row["wanted_tier"], outcome=outcome).inc()
        for tier in row["explored"]:
            EXPLORATIONS.labels(tier=tier).inc()


@contextmanager
def decision_timer(requests: int) -> Iterator[None]:
    """Time a batch of the route stage; each of its ``requests`` waited the whole of it. A
    batch that raised is not a decision and is not observed."""
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    for _ in range(requests):
        DECISION_SECONDS.observe(elapsed)


def observe_generations(rows: Iterable[Mapping[str, Any]]) -> None:
    """The images a batch writes (``generations`` rows: tier, latency in ms). Counted when
    written, not when rendered: a batch that one request broke renders the others again,
    alone, and only the image written is a generation."""
    for row in rows:
        GENERATION_SECONDS.labels(tier=row["tier"]).observe(row["latency_ms"] / 1000.0)


def observe_quality(rows: Iterable[Mapping[str, Any]]) -> None:
    """The scores a batch writes (``quality_scores`` rows: tier, scores names and values)."""
    for row in rows:
        scores = row["scores"]
        for name, value in zip(scores["names"], scores["values"], strict=True):
            QUALITY.labels(tier=row["tier"], metric=name).observe(value)


def outage(exc: BaseException) -> Outage:
    """Which service a transient error came from."""
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return "database"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return "redis"
    if isinstance(exc, BrokerError):
        return "broker"
    if isinstance(exc, StoreUnavailable):
        return "store"
    return "connection"


def failure_reason(exc: BaseException) -> FailureReason:
    """A failed attempt's exception bucketed. torch's OutOfMemoryError is recognised by name,
    so that the API process need not import torch."""
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        return "time_limit"
    if isinstance(exc, MemoryError) or any(
        cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__
    ):
        return "out_of_memory"
    if isinstance(exc, OSError):
        return "io"
    return "error"


def _stage(step: Step) -> dict[str, str]:
    return {"stage": step.kind, "tier": step.tier or ""}


def record_retry(key: tuple[str, Step] | None, exc: BaseException) -> None:
    """A delivery of ``key`` (request id, step) is retried after a transient error."""
    if key is not None:
        RETRIES.labels(**_stage(key[1]), reason=outage(exc)).inc()


def record_store_outage(exc: StoreUnavailable) -> None:
    """A batch's image could not be written: the store is full, read-only or denied."""
    STORE_OUTAGES.labels(reason=exc.reason).inc()


def record_failure(step: Step, exc: BaseException) -> None:
    """An attempt at ``step`` raised ``exc``."""
    FAILURES.labels(**_stage(step), reason=failure_reason(exc)).inc()


def record_give_up(step: Step, reason: GiveUpReason) -> None:
    """``step`` gave up (``stages.give_up``)."""
    GIVE_UPS.labels(**_stage(step), reason=reason).inc()


def record_sweep(resends: Sequence[Send], gave_up: Sequence[Step]) -> None:
    """A sweep: the steps it re-sent, and those it gave up on after too many lost messages."""
    for send in resends:
        RESENDS.labels(**_stage(send.step)).inc()
    for step in gave_up:
        record_give_up(step, "messages_lost")


def record_callback(outcome: CallbackOutcome) -> None:
    """One callback delivery attempt and its outcome (workers/stages/callbacks.py)."""
    if outcome not in get_args(CallbackOutcome):
        raise ValueError(f"unknown callback outcome {outcome!r}")
    CALLBACKS.labels(outcome=outcome).inc()


# --- state: read at scrape time by the API's collectors --------------------------------------


@dataclass(frozen=True)
class Family:
    """One series family a collector reports: its name, type, help text and labels."""

    name: str
    documentation: str
    kind: Literal["counter", "gauge", "info"]
    labels: tuple[str, ...] = ()

    def new(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        return InfoMetricFamily(self.name, self.documentation, labels=self.labels)


IN_FLIGHT = Family(
    "t2iroute_requests_in_flight",
    "Requests not final and with a step open, by state and answering tier (empty before routing)",
    "gauge",
    ("state", "tier"),
)
RECENT = Family(
    "t2iroute_recent_requests",
    "The requests of the last T2IROUTE_METRICS_WINDOW routing decisions, by state and "
    "answering tier",
    "gauge",
    ("state", "tier"),
)
TIER_FAILURES = Family(
    "t2iroute_tier_consecutive_failures",
    "Generations failed in a row on the tier",
    "gauge",
    ("tier",),
)
TIER_OUT = Family(
    "t2iroute_tier_out_of_service",
    "1 while the tier's circuit breaker keeps it out of routing",
    "gauge",
    ("tier",),
)
ROUTER = Family(
    "t2iroute_router",
    "The promoted router version (router_versions), or the baseline policy while none is",
    "info",
    ("version", "kind"),
)
ROUTER_SERVING = Family(
    "t2iroute_router_serving",
    "The router version of the latest routing decision",
    "info",
    ("version",),
)
TRADEOFF = Family(
    "t2iroute_router_tradeoff",
    "Lambda of the latest routing decision: it chose the tier maximising predicted quality "
    "minus lambda times cost",
    "gauge",
)
ALPHA = Family(
    "t2iroute_router_alpha",
    "With two tiers, the PRS threshold alpha = 1/2 - lambda * (cost difference) of the "
    "latest decision: the dearer tier answers when PRS < alpha",
    "gauge",
)
TOKENS = Family(
    "t2iroute_budget_tokens",
    "What each budget bucket holds after the last decision: cost units (spend, rate) or "
    "explorations",
    "gauge",
    ("bucket",),
)
SPENT = Family(
    "t2iroute_budget_spent_units",
    "Cost units spent above the cheapest tier, explorations included",
    "counter",
)
REFUNDED = Family(
    "t2iroute_budget_refunded_units",
    "Cost units given back to the spend bucket for requests that failed (no tier served them)",
    "counter",
)
BUDGET_DECISIONS = Family(
    "t2iroute_budget_decisions",
    "Decisions the budget keeper made; each adds the budget per request to the spend bucket",
    "counter",
)
BUDGET_EXPLORATIONS = Family(
    "t2iroute_budget_explorations",
    "Decisions the budget keeper let explore more tiers",
    "counter",
)
BUDGET_ROUTES = Family(
    "t2iroute_budget_routes",
    "Decisions granted to each tier by the budget keeper",
    "counter",
    ("tier",),
)
BUDGET_GENERATIONS = Family(
    "t2iroute_budget_generations",
    "Images the budget keeper paid for on each tier, explorations included",
    "counter",
    ("tier",),
)
PER_REQUEST = Family(
    "t2iroute_budget_per_request_units",
    "B: cost units each decision adds to the spend bucket (spend over N decisions <= B*N + C)",
    "gauge",
)
BURST = Family(
    "t2iroute_budget_burst_units",
    "C: the spend bucket's capacity in cost units",
    "gauge",
)
TIER_COST = Family(
    "t2iroute_tier_cost_units", "Cost per image of each tier of the pool", "gauge", ("tier",)
)
TIER_EXTRA = Family(
    "t2iroute_tier_extra_cost_units",
    "What the budget keeper charges per image of each tier: its cost above the cheapest",
    "gauge",
    ("tier",),
)
QUEUE_MESSAGES = Family(
    "t2iroute_queue_messages", "Messages waiting in each broker queue", "gauge", ("queue",)
)
UNACKED = Family(
    "t2iroute_broker_unacked_messages",
    "Messages delivered to workers and not yet acknowledged, all queues together",
    "gauge",
)

STATE_FAMILIES: tuple[Family, ...] = (
    IN_FLIGHT,
    RECENT,
    TIER_FAILURES,
    TIER_OUT,
    ROUTER,
    ROUTER_SERVING,
    TRADEOFF,
    ALPHA,
    TOKENS,
    SPENT,
    REFUNDED,
    BUDGET_DECISIONS,
    BUDGET_EXPLORATIONS,
    BUDGET_ROUTES,
    BUDGET_GENERATIONS,
    PER_REQUEST,
    BURST,
    TIER_COST,
    TIER_EXTRA,
    QUEUE_MESSAGES,
    UNACKED,
)


def _counts(
    family: Family,
    rows: Iterable[tuple[Status, str | None, int]],
    zeros: Iterable[tuple[str, str]],
) -> Metric:
    """A family of counts by (state, tier), with a zero for each pair of ``zeros`` that has no
    row, so that a series does not vanish when its count drops to zero."""
    counts = dict.fromkeys(zeros, 0)
    for state, tier, n in rows:
        counts[(state.value, tier or "")] = n
    metric = family.new()
    for labels, n in sorted(counts.items()):
        metric.add_metric(list(labels), n)  # type: ignore[attr-defined]
    return metric


class StateCollector(Collector):
    """A collector of some of ``STATE_FAMILIES``. ``describe`` names them without reading
    anything, so that registering one runs no query."""

    families: tuple[Family, ...] = ()

    def describe(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.new()


class DatabaseCollector(StateCollector):
    """Requests, tier health and the router, read from Postgres in one session per scrape. A
    scrape during a database outage reports none of them (and the rest of the registry)."""

    families = (IN_FLIGHT, RECENT, TIER_FAILURES, TIER_OUT, ROUTER, ROUTER_SERVING, TRADEOFF, ALPHA)

    def collect(self) -> Iterator[Metric]:
        settings = get_settings()
        try:
            with session_scope(settings.database_url) as session:
                found = list(self._read(session, settings))
        except sqlalchemy.exc.SQLAlchemyError as exc:
            log.warning("metrics: the database cannot be read: %s", exc)
            return
        yield from found

    def _read(self, session: Session, settings: Settings) -> Iterator[Metric]:
        tiers = settings.pool.names
        routed = [(Status.ROUTED.value, tier) for tier in tiers]
        in_flight = queries.requests_by_state_and_tier(session, in_flight=True)
        yield _counts(IN_FLIGHT, in_flight, [(Status.QUEUED.value, ""), *routed])
        recent = queries.recent_states(session, settings.metrics_window)
        yield _counts(RECENT, recent, [(state.value, tier) for state in Status for tier in tiers])
        yield from self._tier_health(session)
        yield from self._router(session, settings)

    @staticmethod
    def _tier_health(session: Session) -> Iterator[Metric]:
        failures, out = TIER_FAILURES.new(), TIER_OUT.new()
        down = queries.unavailable_tiers(session)
        for tier, count in queries.tier_failure_counts(session).items():
            failures.add_metric([tier], count)  # type: ignore[attr-defined]
            out.add_metric([tier], 1.0 if tier in down else 0.0)  # type: ignore[attr-defined]
        yield failures
        yield out

    @staticmethod
    def _router(session: Session, settings: Settings) -> Iterator[Metric]:
        active = queries.active_router_version(session)
        router = ROUTER.new()
        if active is None:
            info = {"version": f"baseline:{settings.default_policy}", "kind": "baseline"}
        else:
            info = {"version": active.version, "kind": active.kind}
        router.add_metric([], info)  # type: ignore[attr-defined]
        yield router
        latest = queries.latest_decision(session)
        if latest is None:
            return
        tradeoff, version = latest
        serving = ROUTER_SERVING.new()
        serving.add_metric([], {"version": version})  # type: ignore[attr-defined]
        yield serving
        lam = TRADEOFF.new()
        lam.add_metric([], tradeoff)  # type: ignore[attr-defined]
        yield lam
        pool = settings.pool
        if len(pool) == 2:
            # routing/policy.py: with two tiers scored (1/2, 1 - PRS) the dearer answers
            # when PRS < 1/2 - lambda * (cost difference).
            alpha = ALPHA.new()
            dc = pool.tiers[-1].cost - pool.cheapest.cost
            alpha.add_metric([], 0.5 - tradeoff * dc if dc else 0.5)  # type: ignore[attr-defined]
            yield alpha


@lru_cache(maxsize=1)
def _budget_keeper() -> BudgetKeeper:
    return budget_keeper_from_settings(get_settings())


class BudgetCollector(StateCollector):
    """The pool's prices and the budget's limits (configuration), and the budget keeper's
    buckets and counters (Redis). The in-process keeper of the embedded demo lives in its one
    router process, so an API beside it reports the limits alone."""

    families = (
        PER_REQUEST,
        BURST,
        TIER_COST,
        TIER_EXTRA,
        TOKENS,
        SPENT,
        REFUNDED,
        BUDGET_DECISIONS,
        BUDGET_EXPLORATIONS,
        BUDGET_ROUTES,
        BUDGET_GENERATIONS,
    )

    def collect(self) -> Iterator[Metric]:
        settings = get_settings()
        limits = BudgetLimits.from_settings(settings)
        yield from self._limits(limits)
        if settings.budget_backend != "redis":
            return
        try:
            stats = _budget_keeper().stats()
        except redis.exceptions.RedisError as exc:
            log.warning("metrics: the budget keeper cannot be read: %s", exc)
            return
        yield from self._stats(stats, limits)

    @staticmethod
    def _limits(limits: BudgetLimits) -> Iterator[Metric]:
        per_request, burst = PER_REQUEST.new(), BURST.new()
        per_request.add_metric([], limits.budget_per_request)  # type: ignore[attr-defined]
        burst.add_metric([], limits.burst)  # type: ignore[attr-defined]
        cost, extra = TIER_COST.new(), TIER_EXTRA.new()
        for tier, value in limits.tier_costs.items():
            cost.add_metric([tier], value)  # type: ignore[attr-defined]
            extra.add_metric([tier], limits.extra_cost(tier))  # type: ignore[attr-defined]
        yield from (per_request, burst, cost, extra)

    @staticmethod
    def _stats(stats: Mapping[str, float], limits: BudgetLimits) -> Iterator[Metric]:
        tokens = TOKENS.new()
        for bucket in ("spend", "exploration", "rate"):
            if f"{bucket}_tokens" in stats:
                tokens.add_metric([bucket], stats[f"{bucket}_tokens"])  # type: ignore[attr-defined]
        yield tokens
        for family, key in (
            (SPENT, "spent"),
            (REFUNDED, "refunded"),
            (BUDGET_DECISIONS, "requests"),
            (BUDGET_EXPLORATIONS, "explored"),
        ):
            total = family.new()
            total.add_metric([], stats[key])  # type: ignore[attr-defined]
            yield total
        routes, generations = BUDGET_ROUTES.new(), BUDGET_GENERATIONS.new()
        for tier in limits.tier_costs:
            routes.add_metric([tier], stats[f"{tier}_routes"])  # type: ignore[attr-defined]
            generations.add_metric([tier], stats[f"{tier}_generations"])  # type: ignore[attr-defined]
        yield routes
        yield generations


@lru_cache(maxsize=4)
def _broker_client(url: str) -> redis.Redis:
    # Short timeouts and no retries: a scrape during an outage answers without these series
    # rather than hang.
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


def queue_lengths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue on a Redis broker: kombu keeps a queue as one list per
    priority step (the queue's own name for priority 0)."""
    lengths: dict[str, int] = {}
    pipe = client.pipeline(transaction=False)
    names = list(dict.fromkeys(queues))
    for queue in names:
        for priority in PRIORITY_STEPS:
            pipe.llen(f"{queue}{Channel.sep}{priority}" if priority else queue)
    replies = iter(pipe.execute())
    for queue in names:
        lengths[queue] = sum(int(next(replies)) for _ in PRIORITY_STEPS)
    return lengths


class BrokerCollector(StateCollector):
    """Queue lengths and unacknowledged messages, read from a Redis broker (another broker,
    such as the demo's file system, reports none)."""

    families = (QUEUE_MESSAGES, UNACKED)

    def collect(self) -> Iterator[Metric]:
        settings = get_settings()
        if not settings.broker_url.startswith("redis://"):
            return
        client = _broker_client(settings.broker_url)
        try:
            lengths = queue_lengths(client, settings.queues.values())
            unacked = int(client.hlen(Channel.unacked_key))
        except redis.exceptions.RedisError as exc:
            log.warning("metrics: the broker cannot be read: %s", exc)
            return
        messages = QUEUE_MESSAGES.new()
        for queue, length in lengths.items():
            messages.add_metric([queue], length)  # type: ignore[attr-defined]
        yield messages
        held = UNACKED.new()
        held.add_metric([], unacked)  # type: ignore[attr-defined]
        yield held


# --- exposition ----------------------------------------------------------------------------

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _multiprocess_mode() -> bool:
    """Whether prometheus-client keeps values in files: it decided when it was imported."""
    return values.ValueClass is not values.MutexValue


@lru_cache(maxsize=1)
def _api_registry() -> CollectorRegistry:
    if _multiprocess_mode():
        # Several API processes (uvicorn --workers) behind one port: every process's files.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    for collector in (DatabaseCollector(), BudgetCollector(), BrokerCollector()):
        registry.register(collector)
    return registry


def api_exposition() -> tuple[bytes, str]:
    """The body and content type of the API's ``/metrics``: its own counters and the state
    of the whole system."""
    return generate_latest(_api_registry()), CONTENT_TYPE_LATEST


def serve_worker_metrics(port: int, host: str) -> None:
    """Serve this worker's metrics, every process of its pool summed, on ``host:port`` from a
    thread of the calling (main) process. ``PROMETHEUS_MULTIPROC_DIR`` must have been set
    before prometheus-client was imported."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder or not _multiprocess_mode():
        raise RuntimeError(
            f"worker metrics need {MULTIPROC_ENV} set before prometheus_client is imported"
        )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics of this worker on http://%s:%d/metrics (folder %s)", host, port, folder)


def process_exited(pid: int) -> None:
    """A pool process exited: its live gauges go; its counters stay in the worker's sums."""
    if _multiprocess_mode() and os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def exported_series() -> frozenset[str]:
    """The name of every sample t2iroute exports, API and workers together: what a dashboard
    or an alert may query."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    kinds = [
        (m.name, m.type) for metric in (*WORKER_METRICS, *API_METRICS) for m in metric.describe()
    ]
    kinds += [(family.name, family.kind) for family in STATE_FAMILIES]
    return frozenset(name + suffix for name, kind in kinds for suffix in suffixes[kind])
