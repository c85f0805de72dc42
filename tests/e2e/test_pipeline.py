"""The whole flow with real Celery workers on the real Redis and Postgres: producer ->
router -> edge/cloud generation -> quality -> training pairs -> retraining -> the router
workers serving the promoted version."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from db import queries
from db.models import (
    Generation,
    QualityScore,
    RouterVersion,
    RoutingDecision,
)
from db.session import session_scope
from routing.metrics import METRIC_NAMES, METRICS_VERSION
from tests.labels import seed_training_pairs
from tests.services import celery_worker, wait_until_final, wait_until_steps_closed
from workers.app.celery_app import app
from workers.app.names import TASK_RETRAIN
from workers.services.producer import submit
from workers.settings import Settings

pytestmark = pytest.mark.e2e

PROMPTS = (
    "a red bicycle leaning on a brick wall",
    "three dogs and a cat playing in the snow under a street lamp",
    "a bowl of soup",
    "a wooden boat on a calm lake at dawn with mountains and a castle behind it",
    "an astronaut reading a newspaper",
    "two glasses of wine beside a cheese plate and a candle on a table",
    "a cactus",
    "a knight, a dragon and a princess on a bridge over a river",
)

# The router and budget settings every worker of this module shares.
ROUTING_ENV = {
    "T2IROUTE_CLOUD_RATIO": "0.5",
    "T2IROUTE_CLOUD_BURST": "2",
    "T2IROUTE_EXPLORATION_RATE": "0.5",
    "T2IROUTE_EXPLORATION_BURST": "2",
    "T2IROUTE_RETRAIN_MIN_PAIRS": "40",
}


@pytest.fixture(scope="module")
def workers(tiny_models: dict[str, Path], database: str, settings: Settings) -> Iterator[None]:
    """A router/quality/maintenance worker and a GPU-style solo worker for both tiers."""
    from tests.services import flush_redis

    flush_redis(settings.broker_url, settings.redis_url)
    with (
        celery_worker("route,quality,maintenance", "router", env=ROUTING_ENV),
        celery_worker("edge,cloud", "gpu", env=ROUTING_ENV),
    ):
        yield


def test_submitted_prompts_end_with_images_decisions_and_scores(
    workers: None, clean_db: str, settings: Settings
) -> None:
    ids = [submit(prompt, seed=i).request_id for i, prompt in enumerate(PROMPTS)]
    states = wait_until_final(ids, timeout=240)
    assert set(states.values()) == {"done"}, states
    # An explored request is done once its answer is scored; its other tier goes on.
    wait_until_steps_closed(ids, timeout=120)

    with session_scope(clean_db) as session:
        decisions = {d.request_id: d for d in session.scalars(select(RoutingDecision))}
        assert set(decisions) == set(ids)
        explored = [rid for rid, d in decisions.items() if d.explored]
        assert explored, "the exploration budget should have sampled some requests"
        cloud_generations = session.scalar(
            select(func.count()).select_from(Generation).where(Generation.tier == "cloud")
        )
        # The budget bound holds for every cloud generation, explorations included.
        assert cloud_generations is not None
        assert cloud_generations <= 0.5 * len(ids) + 2

        for rid, decision in decisions.items():
            assert set(decision.predicted_quality) == {"edge", "cloud"}
            assert decision.predicted_quality["edge"] == 0.5
            assert 0.0 <= decision.predicted_quality["cloud"] <= 1.0
            assert decision.router_version.startswith("baseline:")
            tiers = set(queries.wanted_tiers(decision))
            generations = queries.generations_of(session, rid)
            assert {g.tier for g in generations} == tiers
            for generation in generations:
                path = settings.image_store / generation.image_path
                with Image.open(path) as image:
                    assert image.size == (settings.default_width, settings.default_height)
            scores = queries.scored_tiers(session, rid, METRICS_VERSION)
            assert set(scores) == tiers
            for values in scores.values():
                assert len(values) == len(METRIC_NAMES)
                assert all(0.0 < v < 1.0 for v in values)

        labelled = queries.labelled_prompts(session, METRICS_VERSION)
        assert len(labelled) == len(explored)
        assert all(set(tiers) == {"edge", "cloud"} for _, tiers in labelled)
        n_scores = session.scalar(select(func.count()).select_from(QualityScore))
        assert n_scores == sum(len(queries.wanted_tiers(d)) for d in decisions.values())


def test_retraining_promotes_a_better_router_that_workers_then_serve(
    workers: None, clean_db: str, settings: Settings
) -> None:
    seed_training_pairs(clean_db, 64)
    app.send_task(TASK_RETRAIN)
    deadline = time.monotonic() + 240
    active = None
    while active is None and time.monotonic() < deadline:
        time.sleep(1.0)
        with session_scope(clean_db) as session:
            active = queries.active_router_version(session)
    assert active is not None, "retraining did not promote a router"
    assert active.kind == "routet2i"
    assert active.evaluation["apgr"] > active.evaluation["incumbent_apgr"]
    with session_scope(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(RouterVersion)) == 1

    # The router worker reloads the promoted version without a restart.
    request_id = submit("a crowd of people around the fountain", seed=5).request_id
    assert wait_until_final([request_id], timeout=120)[request_id] == "done"
    with session_scope(clean_db) as session:
        decision = queries.get_decision(session, request_id)
        assert decision is not None
        assert decision.router_version == active.version
        assert decision.predicted_metrics is not None
        assert len(decision.predicted_metrics) == len(METRIC_NAMES)
