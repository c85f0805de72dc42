"""The HTTP producer API against the real Postgres and Redis."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from db import queries
from db.models import GenerationRequest
from db.session import session_scope
from workers.api import app, max_body_bytes
from workers.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def client() -> TestClient:
    return TestClient(app)


def test_post_accepts_and_get_reads_the_request(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    reply = client.post("/v1/requests", json={"prompt": "two cats on a sofa", "seed": 3})
    assert reply.status_code == 202
    body = reply.json()
    assert body["created"] and body["enqueued"]
    assert clean_redis.llen(settings.queue_route) == 1

    state = client.get(f"/v1/requests/{body['id']}").json()
    assert state["status"] == "queued"
    assert state["decision"] is None


def test_idempotency_key_header_gives_the_same_request_once(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = client.post("/v1/requests", json={"prompt": "a lighthouse"}, headers=headers).json()
    second = client.post("/v1/requests", json={"prompt": "a lighthouse"}, headers=headers).json()
    assert first["id"] == second["id"]
    assert first["created"] and not second["created"]
    assert clean_redis.llen(settings.queue_route) == 1


@pytest.mark.parametrize(
    ("body", "fields", "message"),
    [
        ({"prompt": "   "}, ["prompt"], "prompt is empty"),
        ({"prompt": "a cat", "width": 30}, ["width"], "multiple of 8"),
        ({"prompt": "a cat", "steps": 0}, ["steps"], "between 1 and"),
        ({"prompt": "", "seed": "7", "tier": "cloud"}, ["prompt", "seed", "tier"], "valid integer"),
    ],
)
def test_bad_input_is_a_422_problem_naming_the_fields_and_nothing_enqueued(
    client: TestClient,
    clean_db: str,
    clean_redis: redis.Redis,
    settings: Settings,
    body: dict[str, object],
    fields: list[str],
    message: str,
) -> None:
    reply = client.post("/v1/requests", json=body)
    assert reply.status_code == 422
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["type"] == "urn:t2iroute:problem:invalid-request"
    assert problem["status"] == 422 and problem["title"]
    assert message in problem["detail"]
    assert [error["field"] for error in problem["errors"]] == fields
    assert clean_redis.llen(settings.queue_route) == 0


def test_a_key_in_the_body_is_refused_rather_than_ignored(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    body = {"prompt": "a lighthouse", "idempotency_key": "order-18"}
    replies = [client.post("/v1/requests", json=body) for _ in range(2)]
    assert [reply.status_code for reply in replies] == [422, 422]
    assert "Idempotency-Key header" in replies[0].json()["detail"]
    assert clean_redis.llen(settings.queue_route) == 0


def test_a_non_ascii_idempotency_key_is_stored_as_sent(
    client: TestClient, clean_db: str, clean_redis: redis.Redis
) -> None:
    headers = {b"Idempotency-Key": "clé-1".encode()}
    first = client.post("/v1/requests", json={"prompt": "a lighthouse"}, headers=headers).json()
    second = client.post("/v1/requests", json={"prompt": "a lighthouse"}, headers=headers).json()
    assert first["id"] == second["id"]
    with session_scope(clean_db) as session:
        assert session.scalars(select(GenerationRequest.idempotency_key)).all() == ["clé-1"]


def test_an_oversized_body_is_a_413_problem(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    reply = client.post("/v1/requests", json={"prompt": "x" * max_body_bytes(settings)})
    assert reply.status_code == 413
    assert reply.json()["type"] == "urn:t2iroute:problem:body-too-large"
    assert clean_redis.llen(settings.queue_route) == 0


def test_unknown_request_is_404(client: TestClient, clean_db: str) -> None:
    reply = client.get("/v1/requests/3f1c1a4e-0000-4000-8000-000000000000")
    assert reply.status_code == 404


def test_health_and_metrics(client: TestClient, clean_db: str, clean_redis: redis.Redis) -> None:
    client.post("/v1/requests", json={"prompt": ""})
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    assert "t2iroute_requests_refused_total" in metrics


def test_metrics_report_a_tier_out_of_service(client: TestClient, clean_db: str) -> None:
    with session_scope(clean_db) as session:
        for _ in range(2):
            queries.record_tier_failure(
                session, "cloud", "generate:cloud: OSError", threshold=2, cooldown_seconds=60
            )
        queries.record_tier_failure(
            session, "edge", "generate:edge: OSError", threshold=2, cooldown_seconds=60
        )
    text = client.get("/metrics").text
    assert 't2iroute_tier_out_of_service{tier="cloud"} 1.0' in text
    assert 't2iroute_tier_out_of_service{tier="edge"} 0.0' in text
    assert 't2iroute_tier_consecutive_failures{tier="cloud"} 2.0' in text
