"""Prometheus metrics over HTTP, from real processes: requests go through real Celery
workers (a prefork router and quality worker, a solo generation worker) on tiny models, the
real Postgres and Redis; then every worker's metrics port and the API's /metrics are scraped
and must agree with what the database and the budget keeper recorded."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import select

from db.models import Dispatch, Generation, QualityScore, RoutingDecision, StepStatus, TierHealth
from db.session import session_scope
from routing.metrics import METRIC_NAMES
from tests.environment import SCRATCH
from tests.fault.servers import free_port
from tests.services import (
    api_server,
    celery_worker,
    wait_until_final,
    wait_until_steps_closed,
)
from workers.services.budget import BudgetLimits
from workers.services.producer import submit
from workers.services.telemetry import FailureReason, decision_outcome
from workers.settings import Settings

pytestmark = pytest.mark.integration

PROMPTS = (
    "a red bicycle leaning on a brick wall",
    "three dogs and a cat playing in the snow under a street lamp",
    "a bowl of soup",
    "a wooden boat on a calm lake at dawn with mountains behind it",
    "an astronaut reading a newspaper",
    "a cactus",
)

# The budget every process of this module shares, the API's included: half the requests may
# go to the cloud and half are explored, so that both tiers generate.
ROUTING_ENV = {
    "T2IROUTE_CLOUD_RATIO": "0.5",
    "T2IROUTE_CLOUD_BURST": "2",
    "T2IROUTE_EXPLORATION_RATE": "0.5",
    "T2IROUTE_EXPLORATION_BURST": "2",
}


def scrape(url: str) -> list[Sample]:
    """Every sample a metrics endpoint serves, parsed as Prometheus parses the text format."""
    reply = httpx.get(url, timeout=30)
    reply.raise_for_status()
    assert reply.headers["content-type"].startswith("text/plain; version=")
    return [
        sample for family in text_string_to_metric_families(reply.text) for sample in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def names(samples: list[Sample]) -> set[str]:
    return {s.name for s in samples}


@pytest.fixture(scope="module")
def api(database: str) -> Iterator[str]:
    """``t2iroute api`` on a free loopback port; its base URL."""
    with api_server(env=ROUTING_ENV) as url:
        yield url


@contextmanager
def metrics_worker(
    queues: str, name: str, *, pool: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A real worker serving its metrics on a free port; the URL of its metrics."""
    port = free_port()
    with celery_worker(
        queues,
        name,
        pool=pool,
        env={**ROUTING_ENV, **(env or {}), "T2IROUTE_METRICS_PORT": str(port)},
    ):
        yield f"http://127.0.0.1:{port}/metrics"


def test_the_api_reports_queued_requests_queue_depth_and_the_budget(
    api: str, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    """No worker runs: the requests wait in the route queue, queued, with no tier yet."""
    for prompt in PROMPTS[:3]:
        submit(prompt)
    samples = scrape(f"{api}/metrics")

    queues = {s.labels["queue"]: s.value for s in samples if s.name == "t2iroute_queue_messages"}
    assert queues == {queue: 3.0 if queue == "route" else 0.0 for queue in settings.queues.values()}
    assert total(samples, "t2iroute_requests_in_flight", state="queued", tier="") == 3
    for tier in settings.pool.names:
        assert total(samples, "t2iroute_requests_in_flight", state="routed", tier=tier) == 0

    limits = BudgetLimits.from_settings(Settings(cloud_ratio=0.5, cloud_burst=2))
    assert total(samples, "t2iroute_budget_per_request_units") == pytest.approx(
        limits.budget_per_request
    )
    assert total(samples, "t2iroute_budget_burst_units") == pytest.approx(limits.burst)
    costs = {s.labels["tier"]: s.value for s in samples if s.name == "t2iroute_tier_cost_units"}
    assert costs == settings.pool.costs()
    assert total(samples, "t2iroute_budget_decisions_total") == 0
    # No decision yet: the promoted router is the baseline policy, and none serves.
    [router] = [s for s in samples if s.name == "t2iroute_router_info"]
    assert router.labels == {"version": f"baseline:{settings.default_policy}", "kind": "baseline"}
    assert "t2iroute_router_tradeoff" not in names(samples)


def test_worker_and_api_metrics_agree_with_the_database(
    api: str,
    tiny_models: dict[str, Path],
    clean_db: str,
    clean_redis: redis.Redis,
    settings: Settings,
) -> None:
    with (
        metrics_worker("route,quality,maintenance", "metrics-router", pool="prefork") as router,
        metrics_worker("edge,cloud", "metrics-gpu", pool="solo") as gpu,
    ):
        ids = [submit(prompt, seed=i).request_id for i, prompt in enumerate(PROMPTS)]
        assert set(wait_until_final(ids, timeout=240).values()) == {"done"}
        wait_until_steps_closed(ids, timeout=120)
        routing, generating = scrape(router), scrape(gpu)
    state = scrape(f"{api}/metrics")
    with session_scope(clean_db) as session:
        decisions = list(session.scalars(select(RoutingDecision).order_by(RoutingDecision.id)))
        generations = list(session.scalars(select(Generation)))
        scores = list(session.scalars(select(QualityScore)))
    assert len(decisions) == len(ids)

    # Decisions, counted by the prefork worker's child and summed by its main process.
    assert total(routing, "t2iroute_decisions_total") == len(decisions)
    by_labels = Counter(
        (d.tier, d.wanted_tier, decision_outcome(d.budget_reason)) for d in decisions
    )
    for (tier, wanted, outcome), count in by_labels.items():
        assert (
            total(routing, "t2iroute_decisions_total", tier=tier, wanted=wanted, outcome=outcome)
            == count
        )
    explored = Counter(tier for d in decisions for tier in d.explored)
    for tier in settings.pool.names:
        assert total(routing, "t2iroute_explorations_total", tier=tier) == explored[tier]
    assert total(routing, "t2iroute_decision_seconds_count") == len(decisions)
    assert total(routing, "t2iroute_decision_seconds_sum") > 0

    # Generations: one observation per image, its latency the one the database holds.
    for tier in settings.pool.names:
        made = [g for g in generations if g.tier == tier]
        assert total(generating, "t2iroute_generation_seconds_count", tier=tier) == len(made)
        assert total(generating, "t2iroute_generation_seconds_sum", tier=tier) == pytest.approx(
            sum(g.latency_ms for g in made) / 1000.0
        )
    assert {g.tier for g in generations} == set(settings.pool.names), "both tiers generated"

    # Quality: every metric of every scored image, by tier.
    for tier in {s.tier for s in scores}:
        scored = [s for s in scores if s.tier == tier]
        for index, metric in enumerate(METRIC_NAMES):
            labels = {"tier": tier, "metric": metric}
            assert total(routing, "t2iroute_quality_score_count", **labels) == len(scored)
            assert total(routing, "t2iroute_quality_score_sum", **labels) == pytest.approx(
                sum(s.scores["values"][index] for s in scored)
            )

    # Each event where it happens, and nothing failed.
    assert "t2iroute_decisions_total" not in names(generating)
    assert "t2iroute_generation_seconds_count" not in names(routing)
    for samples in (routing, generating):
        assert total(samples, "t2iroute_step_failures_total") == 0
        assert total(samples, "t2iroute_retries_total") == 0

    # The state the API reads: the recent requests by tier, the keeper, the router, queues.
    answered = Counter(d.tier for d in decisions)
    for tier in settings.pool.names:
        assert total(state, "t2iroute_recent_requests", state="done", tier=tier) == answered[tier]
        assert total(state, "t2iroute_budget_routes_total", tier=tier) == answered[tier]
        assert total(state, "t2iroute_budget_generations_total", tier=tier) == len(
            [g for g in generations if g.tier == tier]
        )
    assert total(state, "t2iroute_recent_requests") == len(decisions)
    assert total(state, "t2iroute_requests_in_flight") == 0
    assert total(state, "t2iroute_budget_decisions_total") == len(decisions)
    assert total(state, "t2iroute_budget_spent_units_total") == pytest.approx(
        sum(d.spent for d in decisions)
    )
    assert total(state, "t2iroute_budget_explorations_total") == sum(
        1 for d in decisions if d.explored
    )
    spend = total(state, "t2iroute_budget_tokens", bucket="spend")
    assert 0 <= spend <= total(state, "t2iroute_budget_burst_units")
    latest = decisions[-1]
    assert total(state, "t2iroute_router_tradeoff") == pytest.approx(latest.tradeoff)
    dc = settings.pool.tiers[-1].cost - settings.pool.cheapest.cost
    assert total(state, "t2iroute_router_alpha") == pytest.approx(0.5 - latest.tradeoff * dc)
    [serving] = [s for s in state if s.name == "t2iroute_router_serving_info"]
    assert serving.labels == {"version": latest.router_version}
    assert total(state, "t2iroute_queue_messages") == 0
    assert total(state, "t2iroute_broker_unacked_messages") == 0


@pytest.fixture
def corrupt_cloud(tiny_models: dict[str, Path]) -> Path:
    """The tiny cloud model with its weights overwritten: the folder passes the worker's
    start-up check, and every load of the pipeline raises."""
    folder = SCRATCH / "cloud-corrupt"
    if not folder.exists():
        shutil.copytree(tiny_models["cloud"], folder)
        for weights in folder.rglob("*.safetensors"):
            weights.write_bytes(b"these are not safetensors")
    return folder


def test_failed_attempts_and_give_ups_are_counted_by_stage_and_reason(
    api: str,
    corrupt_cloud: Path,
    clean_db: str,
    clean_redis: redis.Redis,
    settings: Settings,
) -> None:
    """Every request is explored on the cloud, whose model cannot load: each attempt fails,
    each cloud step gives up after two, and every request is answered by the edge."""
    explore_all = {
        "T2IROUTE_CLOUD_RATIO": "1",
        "T2IROUTE_EXPLORATION_RATE": "1",
        "T2IROUTE_MAX_ATTEMPTS": "2",
        "T2IROUTE_TIER_FAILURE_THRESHOLD": "100",
    }
    broken = {**explore_all, "T2IROUTE_CLOUD_MODEL": str(corrupt_cloud)}
    with (
        metrics_worker("route,quality", "metrics-router-explore", pool="solo", env=explore_all),
        metrics_worker("edge,cloud", "metrics-gpu-broken", pool="solo", env=broken) as gpu,
    ):
        ids = [submit(prompt, seed=1).request_id for prompt in PROMPTS[:3]]
        assert set(wait_until_final(ids, timeout=240).values()) == {"done"}
        wait_until_steps_closed(ids, timeout=120)
        generating = scrape(gpu)
    state = scrape(f"{api}/metrics")
    with session_scope(clean_db) as session:
        cloud_steps = list(
            session.scalars(select(Dispatch).where(Dispatch.step == "generate:cloud"))
        )
        health = session.get(TierHealth, "cloud")
        cloud_images = session.scalars(select(Generation).where(Generation.tier == "cloud")).all()
    assert len(cloud_steps) == len(ids) and not cloud_images
    assert all(s.status in (StepStatus.FAILED, StepStatus.ABANDONED) for s in cloud_steps)

    failures = [s for s in generating if s.name == "t2iroute_step_failures_total"]
    assert {(s.labels["stage"], s.labels["tier"]) for s in failures} == {("generate", "cloud")}
    assert {s.labels["reason"] for s in failures} <= set(get_args(FailureReason))
    assert sum(s.value for s in failures) == sum(s.failures for s in cloud_steps) >= 2 * len(ids)
    assert (
        total(generating, "t2iroute_steps_given_up_total", stage="generate", tier="cloud")
        == total(
            generating,
            "t2iroute_steps_given_up_total",
            stage="generate",
            tier="cloud",
            reason="failed_attempts",
        )
        == len(ids)
    )
    assert total(generating, "t2iroute_generation_seconds_count", tier="cloud") == 0
    assert total(generating, "t2iroute_generation_seconds_count", tier="edge") == len(ids)
    assert health is not None
    assert total(state, "t2iroute_tier_consecutive_failures", tier="cloud") == (
        health.consecutive_failures
    )
