"""The HTTP API over the whole flow, with real Celery workers on the real Postgres and Redis:
a request followed from submission to its images, timings, decision and scores; its images
fetched with their caching headers; a request cancelled before any worker ran, which the
workers then leave alone; a late cancel."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text

from db.session import session_scope
from routing.metrics import METRIC_NAMES
from tests.integration.conftest import TABLES
from tests.services import celery_worker, flush_redis
from workers.entrypoints.http.app import create_app
from workers.settings import Settings

pytestmark = pytest.mark.integration

PROMPTS = (
    "a red bicycle leaning on a brick wall",
    "three dogs and a cat playing in the snow under a street lamp",
    "a bowl of soup",
    "a wooden boat on a calm lake at dawn with mountains and a castle behind it",
)
# Every request may explore while the exploration bucket lasts, so some have two images.
ROUTING_ENV = {
    "T2IROUTE_CLOUD_RATIO": "0.5",
    "T2IROUTE_CLOUD_BURST": "2",
    "T2IROUTE_EXPLORATION_RATE": "1.0",
    "T2IROUTE_EXPLORATION_BURST": "2",
}
FINAL = {"done", "failed", "cancelled"}


@dataclass(frozen=True)
class Run:
    client: TestClient
    #: Requests submitted while the workers ran, and the one cancelled before they started.
    ids: list[str]
    withdrawn: str


def _wait(client: TestClient, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll the API until every request is final and no step of theirs is open."""
    deadline = time.monotonic() + timeout
    while True:
        views = {rid: client.get(f"/v1/requests/{rid}").json() for rid in ids}
        settled = all(
            view["status"] in FINAL
            and all(stage["finished_at"] is not None for stage in view["stages"])
            for view in views.values()
        )
        if settled:
            return views
        if time.monotonic() > deadline:
            raise TimeoutError({rid: view["status"] for rid, view in views.items()})
        time.sleep(0.5)


@pytest.fixture(scope="module")
def run(tiny_models: dict[str, Path], database: str, settings: Settings) -> Iterator[Run]:
    flush_redis(settings.broker_url, settings.redis_url)
    with session_scope(database) as session:
        session.execute(text(f"TRUNCATE {TABLES} CASCADE"))
    with TestClient(create_app(require_keys=False)) as client:
        withdrawn = client.post("/v1/requests", json={"prompt": "a withdrawn lighthouse"})
        rid = withdrawn.json()["id"]
        assert client.post(f"/v1/requests/{rid}/cancel").json()["status"] == "cancelled"
        queues = ",".join(settings.pool.names)
        with (
            celery_worker("route,quality,maintenance", "api-router", env=ROUTING_ENV),
            celery_worker("", "api-gpu", tiers=queues, env=ROUTING_ENV),
        ):
            ids = [
                client.post("/v1/requests", json={"prompt": p, "seed": i}).json()["id"]
                for i, p in enumerate(PROMPTS)
            ]
            _wait(client, ids, timeout=300)
            yield Run(client, ids, rid)


def test_a_done_request_shows_its_decision_timings_images_and_scores(
    run: Run, settings: Settings
) -> None:
    for rid in run.ids:
        view = run.client.get(f"/v1/requests/{rid}").json()
        assert view["status"] == "done", view
        decision = view["decision"]
        assert decision["tier"] in settings.pool.names
        assert set(decision["predicted_quality"]) == set(settings.pool.names)
        assert isinstance(decision["tradeoff"], float)
        assert decision["router_version"] and decision["budget_reason"]
        assert view["answer_tier"] == decision["tier"]
        tiers = {decision["tier"], *decision["explored"]}
        assert {g["tier"] for g in view["generations"]} == tiers
        for generation in view["generations"]:
            assert generation["model"] and generation["latency_ms"] > 0
            [quality] = generation["quality"]
            assert list(quality["scores"]) == list(METRIC_NAMES)
            assert all(0.0 <= score <= 1.0 for score in quality["scores"].values())
        stages = {stage["step"]: stage for stage in view["stages"]}
        assert set(stages) == {"route"} | {f"{k}:{t}" for t in tiers for k in ("generate", "score")}
        for stage in stages.values():
            assert stage["status"] == "done"
            assert stage["waited_ms"] >= 0 and stage["ran_ms"] >= 0
            assert stage["dispatched_at"] <= stage["started_at"] <= stage["finished_at"]


def test_the_answer_image_is_a_png_with_an_etag_and_immutable(run: Run) -> None:
    rid = run.ids[0]
    view = run.client.get(f"/v1/requests/{rid}").json()
    reply = run.client.get(f"/v1/requests/{rid}/image")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "image/png"
    assert "immutable" in reply.headers["cache-control"]
    etag = reply.headers["etag"]
    with Image.open(io.BytesIO(reply.content)) as image:
        assert image.format == "PNG"
        assert image.size == (view["width"], view["height"])
    again = run.client.get(f"/v1/requests/{rid}/image", headers={"If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    other = run.client.get(f"/v1/requests/{rid}/image", headers={"If-None-Match": '"x"'})
    assert other.status_code == 200
    by_tier = run.client.get(f"/v1/requests/{rid}/image", params={"tier": view["answer_tier"]})
    assert by_tier.headers["etag"] == etag


def test_an_explored_tier_image_is_served_by_name(run: Run, settings: Settings) -> None:
    views = [run.client.get(f"/v1/requests/{rid}").json() for rid in run.ids]
    explored = [v for v in views if v["decision"]["explored"]]
    assert explored, "the exploration bucket granted none"
    view = explored[0]
    tier = view["decision"]["explored"][0]
    reply = run.client.get(f"/v1/requests/{view['id']}/image", params={"tier": tier})
    assert (reply.status_code, reply.headers["content-type"]) == (200, "image/png")
    answer = run.client.get(f"/v1/requests/{view['id']}/image")
    assert reply.headers["etag"] != answer.headers["etag"]
    unknown = run.client.get(f"/v1/requests/{view['id']}/image", params={"tier": "nowhere"})
    assert unknown.status_code == 404 and "in the pool" in unknown.json()["detail"]
    plain = next((v for v in views if not v["decision"]["explored"]), None)
    if plain is not None:
        missing = next(t for t in settings.pool.names if t != plain["decision"]["tier"])
        reply = run.client.get(f"/v1/requests/{plain['id']}/image", params={"tier": missing})
        assert reply.status_code == 404
        assert "not generated on tier" in reply.json()["detail"]


def test_the_workers_leave_a_request_cancelled_before_routing_alone(
    run: Run, settings: Settings
) -> None:
    view = run.client.get(f"/v1/requests/{run.withdrawn}").json()
    assert view["status"] == "cancelled"
    assert view["decision"] is None and view["generations"] == []
    [route] = view["stages"]
    assert (route["status"], route["starts"]) == ("abandoned", 0)
    image = run.client.get(f"/v1/requests/{run.withdrawn}/image")
    assert image.status_code == 409 and "cancelled" in image.json()["detail"]
    broker = redis.Redis.from_url(settings.broker_url)
    assert broker.llen(settings.queue_route) == 0, "its route message was never consumed"


def test_a_done_request_cannot_be_cancelled(run: Run) -> None:
    reply = run.client.post(f"/v1/requests/{run.ids[0]}/cancel")
    assert reply.status_code == 409
    assert reply.json()["type"] == "urn:t2iroute:problem:too-late-to-cancel"
    assert "it is done" in reply.json()["detail"]


def test_listing_and_budget_agree_with_the_run(run: Run, settings: Settings) -> None:
    by_tier = {
        tier: {
            item["id"]
            for item in run.client.get("/v1/requests", params={"tier": tier}).json()["items"]
        }
        for tier in settings.pool.names
    }
    assert set().union(*by_tier.values()) == set(run.ids)
    budget = run.client.get("/v1/budget").json()
    assert budget["decisions"] == len(run.ids)
    assert budget["answers"] == {tier: len(ids) for tier, ids in by_tier.items()}
    images = sum(
        len(run.client.get(f"/v1/requests/{rid}").json()["generations"]) for rid in run.ids
    )
    assert sum(budget["generations"].values()) == images
    assert budget["spent"] <= budget["allowed"]
    assert budget["buckets"]["requests"] == len(run.ids)
