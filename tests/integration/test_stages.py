"""Stage functions on the real Postgres and Redis: a redelivered task changes nothing."""

from __future__ import annotations

import pytest
import redis
from PIL import Image

from db import queries
from db.models import Status, Tier
from db.session import session_scope
from workers import stages
from workers.budget import budget_keeper_from_settings
from workers.images import ImageStore
from workers.producer import submit
from workers.runtime import RouterService
from workers.settings import Settings

pytestmark = pytest.mark.integration


def test_routing_twice_records_one_decision_and_spends_once(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    budget = budget_keeper_from_settings(settings)
    router = RouterService(settings)
    request_id = submit("a crowd of people in a stadium at night", seed=1).request_id
    with session_scope(clean_db) as session:
        first = stages.route_request(session, request_id, router, budget)
    with session_scope(clean_db) as session:
        again = stages.route_request(session, request_id, router, budget)
        request = queries.get_request(session, request_id)
        assert request is not None and request.status is Status.ROUTED
    assert again == first
    assert budget.stats()["requests"] == 1


def test_generation_is_stored_once_per_tier(
    clean_db: str,
    clean_redis: redis.Redis,
    settings: Settings,
) -> None:
    budget = budget_keeper_from_settings(settings)
    request_id = submit("a teapot", seed=2).request_id
    with session_scope(clean_db) as session:
        routed = stages.route_request(session, request_id, RouterService(settings), budget)
    tier = routed.tiers[0]
    calls = []

    def render(request: object) -> Image.Image:
        calls.append(request)
        return Image.new("RGB", (64, 64), "blue")

    store = ImageStore(settings.image_store)
    for _ in range(2):
        with session_scope(clean_db) as session:
            generation = stages.generate_image(
                session, request_id, tier, model_name="m", render=render, store=store, worker="w"
            )
    assert len(calls) == 1
    assert store.resolve(generation.image_path).exists()
    other = Tier.CLOUD if tier is Tier.EDGE else Tier.EDGE
    if other not in routed.tiers:
        with session_scope(clean_db) as session, pytest.raises(stages.RequestGone):
            stages.generate_image(
                session, request_id, other, model_name="m", render=render, store=store, worker="w"
            )


def test_a_final_request_is_gone_for_every_stage(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a lamp", seed=3).request_id
    with session_scope(clean_db) as session:
        assert queries.fail(session, request_id, "cancelled by test")
    with session_scope(clean_db) as session, pytest.raises(stages.RequestGone):
        stages.route_request(
            session, request_id, RouterService(settings), budget_keeper_from_settings(settings)
        )
