"""Idempotency keys against the real Postgres and Redis: a retry is the first request again
only when it asks for the same thing, every stored field compared after the defaults are
applied (as Stripe does: the same key with other parameters is an error), and a refusal
names each field that differs, in the producer and over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from db.models import GenerationRequest
from db.session import session_scope
from workers.entrypoints.http.app import create_app
from workers.services.producer import InvalidRequest, submit
from workers.settings import Settings

pytestmark = pytest.mark.integration

DIFFERS = "differs from the request first made with this key"

#: A first request stating every field the request stores.
FULL: dict[str, Any] = {
    "width": 128,
    "height": 96,
    "steps": 30,
    "seed": 7,
    "guidance_scale": 6.5,
    "callback_url": "https://hooks.example.com/t2i",
    "metadata": {"order": 17, "tags": ["a", "b"]},
}


def _rows(url: str) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(GenerationRequest)) or 0)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(require_keys=False)) as client:
        yield client


def test_a_retry_with_the_prompt_alone_is_refused_naming_every_field_left_out(
    clean_db: str, clean_redis: redis.Redis
) -> None:
    submit("a lighthouse at dusk", idempotency_key="order-1", **FULL)
    with pytest.raises(InvalidRequest) as refused:
        submit("a lighthouse at dusk", idempotency_key="order-1")
    assert {p.field for p in refused.value.problems} == set(FULL)
    assert all(p.message.startswith(DIFFERS) for p in refused.value.problems)
    assert "used before with other" in str(refused.value)
    assert _rows(clean_db) == 1


@pytest.mark.parametrize("left_out", sorted(FULL))
def test_a_retry_leaving_one_field_out_is_refused_naming_it(
    clean_db: str, clean_redis: redis.Redis, left_out: str
) -> None:
    submit("a lighthouse at dusk", idempotency_key="order-2", **FULL)
    retry = {name: value for name, value in FULL.items() if name != left_out}
    with pytest.raises(InvalidRequest) as refused:
        submit("a lighthouse at dusk", idempotency_key="order-2", **retry)
    assert [(p.field, p.message.startswith(DIFFERS)) for p in refused.value.problems] == [
        (left_out, True)
    ]


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("width", 256),
        ("steps", 31),
        ("seed", 8),
        ("guidance_scale", 6.0),
        ("callback_url", "https://hooks.example.com/other"),
        ("metadata", {"order": 18, "tags": ["a", "b"]}),
    ],
)
def test_a_retry_stating_one_field_otherwise_is_refused_naming_it(
    clean_db: str, clean_redis: redis.Redis, field: str, other: Any
) -> None:
    submit("a lighthouse at dusk", idempotency_key="order-3", **FULL)
    with pytest.raises(InvalidRequest) as refused:
        submit("a lighthouse at dusk", idempotency_key="order-3", **{**FULL, field: other})
    assert [p.field for p in refused.value.problems] == [field]


def test_a_retry_stating_more_than_the_first_is_refused(
    clean_db: str, clean_redis: redis.Redis
) -> None:
    submit("a lighthouse at dusk", idempotency_key="order-4")
    with pytest.raises(InvalidRequest) as refused:
        submit("a lighthouse at dusk", idempotency_key="order-4", steps=30, metadata={})
    assert [p.field for p in refused.value.problems] == ["steps", "metadata"]


def test_the_same_request_again_is_the_first_one_defaults_and_all(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    full = submit("a lighthouse at dusk", idempotency_key="order-5", **FULL)
    again = submit("  a lighthouse at dusk\n", idempotency_key="order-5", **FULL)
    assert (again.request_id, again.created) == (full.request_id, False)

    # Nothing stated but the prompt: the seed a key's request gets is the key's own, so a
    # retry that states nothing either is the same request.
    bare = submit("a cat", idempotency_key="order-6")
    assert submit("a cat", idempotency_key="order-6").request_id == bare.request_id
    # A default stated is the default.
    stated = submit("a cat", idempotency_key="order-6", width=settings.default_width)
    assert (stated.request_id, stated.created) == (bare.request_id, False)
    assert _rows(clean_db) == 2


def test_a_keys_seed_is_its_own_and_requests_without_a_key_get_random_ones(
    clean_db: str, clean_redis: redis.Redis
) -> None:
    ids = [submit("a cat", idempotency_key=f"order-{n}").request_id for n in range(8)]
    ids += [submit("a cat").request_id for _ in range(8)]
    with session_scope(clean_db) as session:
        seeds = [
            session.scalars(select(GenerationRequest.seed).where(GenerationRequest.id == i)).one()
            for i in ids
        ]
    assert len(set(seeds)) == len(seeds)


def test_over_http_the_conflict_is_a_422_naming_each_field_that_differs(
    client: TestClient, clean_db: str, clean_redis: redis.Redis
) -> None:
    headers = {"Idempotency-Key": "order-7"}
    first = client.post("/v1/requests", json={"prompt": "a lighthouse", **FULL}, headers=headers)
    assert first.status_code == 202, first.text
    retry = client.post("/v1/requests", json={"prompt": "a lighthouse"}, headers=headers)
    assert retry.status_code == 422, retry.text
    assert retry.headers["content-type"] == "application/problem+json"
    problem = retry.json()
    assert problem["type"] == "urn:t2iroute:problem:invalid-request"
    assert "idempotency key 'order-7' was used before with other" in problem["detail"]
    assert {e["field"] for e in problem["errors"]} == set(FULL)
    assert all(e["detail"].startswith(DIFFERS) for e in problem["errors"])

    same = client.post("/v1/requests", json={"prompt": "a lighthouse", **FULL}, headers=headers)
    assert same.status_code == 202 and same.json()["id"] == first.json()["id"]
    assert not same.json()["created"]
