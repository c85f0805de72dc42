"""The HTTP producer API against the real Postgres and Redis."""

from __future__ import annotations

import pytest
import redis
from fastapi.testclient import TestClient

from workers.api import app
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
    ("body", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "a cat", "width": 30}, "multiple of 8"),
        ({"prompt": "a cat", "steps": 0}, "between 1 and"),
    ],
)
def test_bad_input_is_a_422_with_the_reason_and_nothing_enqueued(
    client: TestClient,
    clean_db: str,
    clean_redis: redis.Redis,
    settings: Settings,
    body: dict[str, object],
    message: str,
) -> None:
    reply = client.post("/v1/requests", json=body)
    assert reply.status_code == 422
    assert message in reply.json()["detail"]
    assert clean_redis.llen(settings.queue_route) == 0


def test_unknown_request_is_404(client: TestClient, clean_db: str) -> None:
    reply = client.get("/v1/requests/3f1c1a4e-0000-4000-8000-000000000000")
    assert reply.status_code == 404


def test_health_and_metrics(client: TestClient, clean_db: str, clean_redis: redis.Redis) -> None:
    client.post("/v1/requests", json={"prompt": ""})
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    assert "t2iroute_requests_refused_total" in metrics
