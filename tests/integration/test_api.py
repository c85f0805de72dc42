"""The HTTP API against the real Postgres and Redis, without workers: what a request looks
like before it is routed, its listing, cancelling it, the budget, readiness and refusals.
Keys are not required here (tests/integration/test_api_auth.py has auth); images and the
whole flow with real workers are in test_api_flow.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from db import queries
from db.models import Dispatch, GenerationRequest, RoutingDecision, Status, StepStatus
from db.session import session_scope
from tests.filesystems import FILLER, can_mount, fill, remount, tmpfs
from workers.app import flow
from workers.entrypoints.http.app import create_app
from workers.entrypoints.http.body import max_body_bytes
from workers.settings import Settings, get_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(require_keys=False)) as client:
        yield client


def _post(client: TestClient, prompt: str = "a lighthouse", **fields: object) -> str:
    reply = client.post("/v1/requests", json={"prompt": prompt, **fields})
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


class Reply(Protocol):
    """An HTTP response, from whichever client."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


def _problem(reply: Reply, status: int, kind: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = reply.json()
    assert problem["type"] == f"urn:t2iroute:problem:{kind}"
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


def test_post_accepts_and_get_reads_the_request(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    body = {
        "prompt": "two cats on a sofa",
        "seed": 3,
        "callback_url": "https://hooks.example.com/t2i?team=7",
        "metadata": {"order": "A-17", "tags": ["cats", "sofa"], "priority": 2.5, "x": None},
    }
    reply = client.post("/v1/requests", json=body)
    assert reply.status_code == 202
    accepted = reply.json()
    assert accepted["created"] and accepted["enqueued"]
    assert reply.headers["location"] == f"/v1/requests/{accepted['id']}"
    assert clean_redis.llen(settings.queue_route) == 1

    state = client.get(f"/v1/requests/{accepted['id']}").json()
    assert state["status"] == "queued"
    assert state["decision"] is None and state["answer_tier"] is None
    assert state["generations"] == []
    assert (state["prompt"], state["seed"]) == ("two cats on a sofa", 3)
    assert state["callback_url"] == body["callback_url"]
    assert state["metadata"] == body["metadata"]
    assert state["created_at"] == state["updated_at"]
    [route] = state["stages"]
    assert (route["step"], route["status"], route["started_at"], route["waited_ms"]) == (
        "route",
        "pending",
        None,
        None,
    )


def test_idempotency_key_header_gives_the_same_request_once(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    headers = {"Idempotency-Key": "order-17"}
    body = {"prompt": "a lighthouse", "metadata": {"n": 1}}
    first = client.post("/v1/requests", json=body, headers=headers).json()
    second = client.post("/v1/requests", json=body, headers=headers).json()
    assert first["id"] == second["id"]
    assert first["created"] and not second["created"]
    assert clean_redis.llen(settings.queue_route) == 1
    other = client.post("/v1/requests", json={**body, "metadata": {"n": 2}}, headers=headers)
    problem = _problem(other, 422, "invalid-request")
    assert "was used before with other metadata" in str(problem["detail"])


@pytest.mark.parametrize(
    ("body", "fields", "message"),
    [
        ({"prompt": "   "}, ["prompt"], "prompt is empty"),
        ({"prompt": "a cat", "width": 30}, ["width"], "multiple of 8"),
        ({"prompt": "a cat", "steps": 0}, ["steps"], "between 1 and"),
        ({"prompt": "", "seed": "7", "tier": "cloud"}, ["prompt", "seed", "tier"], "valid integer"),
        (
            {"prompt": "a cat", "callback_url": "ftp://x.example/"},
            ["callback_url"],
            "http or https",
        ),
        ({"prompt": "a cat", "metadata": [1, 2]}, ["metadata"], "must be a JSON object"),
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
    problem = _problem(client.post("/v1/requests", json=body), 422, "invalid-request")
    assert message in str(problem["detail"])
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


def test_a_non_ascii_idempotency_key_is_stored_and_found_as_sent(
    client: TestClient, clean_db: str, clean_redis: redis.Redis
) -> None:
    headers = {b"Idempotency-Key": "clé-1".encode()}
    first = client.post("/v1/requests", json={"prompt": "a lighthouse"}, headers=headers).json()
    second = client.post("/v1/requests", json={"prompt": "a lighthouse"}, headers=headers).json()
    assert first["id"] == second["id"]
    with session_scope(clean_db) as session:
        assert session.scalars(select(GenerationRequest.idempotency_key)).all() == ["clé-1"]
    listed = client.get("/v1/requests", params={"idempotency_key": "clé-1"}).json()
    assert [item["id"] for item in listed["items"]] == [first["id"]]
    assert listed["items"][0]["idempotency_key"] == "clé-1"


def test_an_oversized_body_is_a_413_problem(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    reply = client.post("/v1/requests", json={"prompt": "x" * max_body_bytes(settings)})
    _problem(reply, 413, "body-too-large")
    assert clean_redis.llen(settings.queue_route) == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/requests/3f1c1a4e-0000-4000-8000-000000000000",
        "/v1/requests/not-an-id",
        "/v1/requests/3F1C1A4E-0000-4000-8000-000000000000/image",
        "/v1/nothing-here",
    ],
)
def test_what_is_not_there_is_a_404_problem(client: TestClient, clean_db: str, path: str) -> None:
    _problem(client.get(path), 404, "not-found")


def test_another_method_is_a_405_problem(client: TestClient) -> None:
    reply = client.delete("/v1/budget")
    _problem(reply, 405, "method-not-allowed")
    assert reply.headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1000}, "limit"),
        ({"status": "lost"}, "status"),
        ({"tier": "no-such-tier"}, "tier"),
        ({"created_after": "2026-01-01T00:00:00"}, "created_after"),
        ({"created_before": "yesterday"}, "created_before"),
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
        ({"cursor": "é"}, "cursor"),
        ({"idempotency_key": "bad\u200bkey"}, "idempotency_key"),
    ],
)
def test_a_bad_listing_parameter_is_a_422_problem_naming_it(
    client: TestClient, clean_db: str, query: dict[str, str | int], field: str
) -> None:
    problem = _problem(client.get("/v1/requests", params=query), 422, "invalid-request")
    assert [error["field"] for error in problem["errors"]] == [field]
    assert str(problem["detail"]).startswith(f"invalid request: {field}: ")


def _decide(url: str, request_id: str, tier: str, spent: float = 0.0) -> None:
    """A routing decision as the router writes one (the listing and budget read them)."""
    with session_scope(url) as session:
        queries.insert_ignore(
            session,
            RoutingDecision,
            {
                "request_id": request_id,
                "router_version": "baseline:noun_count",
                "predicted_quality": {tier: 0.5},
                "tradeoff": 0.25,
                "wanted_tier": tier,
                "tier": tier,
                "explored": [],
                "spent": spent,
                "budget_reason": "granted",
                "escalations": [],
            },
        )
        queries.transition(session, request_id, from_status=Status.QUEUED, to_status=Status.ROUTED)


def test_listing_pages_newest_first_with_filters(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    tiers = settings.pool.names
    ids = [_post(client, f"prompt {i}", metadata={"i": i}) for i in range(7)]
    for i, rid in enumerate(ids[:4]):
        _decide(clean_db, rid, tiers[i % len(tiers)])
    newest_first = list(reversed(ids))

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        page = client.get("/v1/requests", params=params).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == newest_first
    assert pages == 3

    routed = client.get("/v1/requests", params={"status": "routed"}).json()["items"]
    assert [item["id"] for item in routed] == list(reversed(ids[:4]))
    on_first = client.get("/v1/requests", params={"tier": tiers[0]}).json()["items"]
    assert {item["id"] for item in on_first} == {ids[i] for i in range(4) if i % len(tiers) == 0}
    assert {item["tier"] for item in on_first} == {tiers[0]}

    with session_scope(clean_db) as session:
        moments = dict(
            session.execute(select(GenerationRequest.id, GenerationRequest.created_at)).all()
        )
    middle = moments[ids[3]]
    after = client.get(
        "/v1/requests", params={"created_after": middle.isoformat(), "limit": 200}
    ).json()["items"]
    assert {item["id"] for item in after} == {rid for rid in ids if moments[rid] >= middle}
    before = client.get("/v1/requests", params={"created_before": middle.isoformat()}).json()[
        "items"
    ]
    assert {item["id"] for item in before} == {rid for rid in ids if moments[rid] < middle}
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert client.get("/v1/requests", params={"created_after": future}).json() == {
        "items": [],
        "next": None,
    }


def test_cancel_before_routing_ends_the_request_and_its_steps(
    client: TestClient, clean_db: str, clean_redis: redis.Redis
) -> None:
    rid = _post(client, callback_url="http://127.0.0.1:9/hook")
    reply = client.post(f"/v1/requests/{rid}/cancel")
    assert reply.status_code == 200, reply.text
    view = reply.json()
    assert view["status"] == "cancelled"
    assert [(s["step"], s["status"]) for s in view["stages"]] == [("route", "abandoned")]
    assert view["stages"][0]["finished_at"] is not None
    # Cancelling again answers the same; the request stays cancelled.
    again = client.post(f"/v1/requests/{rid}/cancel")
    assert (again.status_code, again.json()["status"]) == (200, "cancelled")
    with session_scope(clean_db) as session:
        assert queries.callback_delivery(session, rid) is not None
        # Nothing a late worker could restart: the route step is closed.
        assert queries.start_step(session, rid, flow.ROUTE.key, redelivered=False) is None


def _route(url: str, request_id: str, tier: str) -> None:
    """What a router worker leaves: its decision, the route step done, the generate step
    recorded and pending."""
    _decide(url, request_id, tier)
    with session_scope(url) as session:
        queries.finish_step(session, request_id, flow.ROUTE.key)
        queries.record_steps(session, request_id, [flow.generate(tier).key])


def test_cancel_of_a_routed_request_not_generating_closes_its_generate_step(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    tier = settings.pool.names[-1]
    rid = _post(client)
    _route(clean_db, rid, tier)
    view = client.post(f"/v1/requests/{rid}/cancel").json()
    assert view["status"] == "cancelled"
    steps = {s["step"]: s["status"] for s in view["stages"]}
    assert steps == {"route": "done", f"generate:{tier}": "abandoned"}
    with session_scope(clean_db) as session:
        key = flow.generate(tier).key
        assert queries.start_step(session, rid, key, redelivered=False) is None


def test_a_late_cancel_is_a_409_problem_saying_why(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    tier = settings.pool.names[0]
    rid = _post(client)
    _route(clean_db, rid, tier)
    with session_scope(clean_db) as session:
        assert queries.start_step(session, rid, flow.generate(tier).key, redelivered=False)
    problem = _problem(client.post(f"/v1/requests/{rid}/cancel"), 409, "too-late-to-cancel")
    assert f"generate:{tier} started at" in str(problem["detail"])
    assert client.get(f"/v1/requests/{rid}").json()["status"] == "routed"

    with session_scope(clean_db) as session:
        queries.transition(session, rid, from_status=Status.ROUTED, to_status=Status.DONE)
    problem = _problem(client.post(f"/v1/requests/{rid}/cancel"), 409, "too-late-to-cancel")
    assert "it is done" in str(problem["detail"])


def test_a_cancel_waits_for_a_generation_starting_and_then_refuses(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    """A worker's start of the generate step, not yet committed, holds the step's row: the
    cancel waits for it and then sees the step started; nothing is half cancelled."""
    tier = settings.pool.names[0]
    rid = _post(client)
    _route(clean_db, rid, tier)
    replies: list[Reply] = []
    with session_scope(clean_db) as worker:
        assert queries.start_step(worker, rid, flow.generate(tier).key, redelivered=False)
        cancelling = threading.Thread(
            target=lambda: replies.append(client.post(f"/v1/requests/{rid}/cancel"))
        )
        cancelling.start()
        time.sleep(1.0)
        assert cancelling.is_alive(), "the cancel did not wait for the starting worker"
    cancelling.join(timeout=30)
    [reply] = replies
    _problem(reply, 409, "too-late-to-cancel")
    with session_scope(clean_db) as session:
        assert queries.get_request(session, rid).status is Status.ROUTED  # type: ignore[union-attr]
        step = session.scalar(
            select(Dispatch).where(
                Dispatch.request_id == rid, Dispatch.step == flow.generate(tier).key
            )
        )
        assert step is not None and step.status is StepStatus.RUNNING


def test_budget_reports_buckets_and_the_spend_of_the_window(
    client: TestClient, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    cheap, dear = settings.pool.names[0], settings.pool.names[-1]
    ids = [_post(client, f"prompt {i}") for i in range(3)]
    _decide(clean_db, ids[0], dear, spent=9.0)
    _decide(clean_db, ids[1], cheap)
    _decide(clean_db, ids[2], cheap)
    with session_scope(clean_db) as session:
        old = datetime.now(UTC) - timedelta(hours=3)
        session.execute(
            update(RoutingDecision)
            .where(RoutingDecision.request_id == ids[2])
            .values(created_at=old)
        )
    budget = client.get("/v1/budget", params={"window_minutes": 60}).json()
    assert budget["buckets_error"] is None
    assert budget["buckets"]["spend_tokens"] >= 0.0
    assert (budget["decisions"], budget["spent"]) == (2, 9.0)
    assert budget["answers"] == {t: {dear: 1, cheap: 1}.get(t, 0) for t in settings.pool.names}
    assert budget["allowed"] == pytest.approx(2 * budget["budget_per_request"] + budget["burst"])
    assert budget["extra_cost"][cheap] == 0.0
    assert budget["tradeoff"] == 0.25
    wider = client.get("/v1/budget", params={"window_minutes": 240}).json()
    assert wider["decisions"] == 3
    _problem(client.get("/v1/budget", params={"window_minutes": 0}), 422, "invalid-request")


def test_health_readiness_and_metrics(
    client: TestClient, clean_db: str, clean_redis: redis.Redis
) -> None:
    client.post("/v1/requests", json={"prompt": ""})
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "budget": "ok", "images": "ok"},
    }
    metrics = client.get("/metrics").text
    assert "t2iroute_requests_refused" in metrics


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")
def test_readiness_names_an_image_store_that_cannot_take_a_file(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 18, defect 7: a full or read-only store is an outage /readyz names."""
    with tmpfs(tmp_path / "images", "64k") as store:
        monkeypatch.setenv("T2IROUTE_IMAGE_STORE", str(store))
        get_settings.cache_clear()
        try:
            assert client.get("/readyz").status_code == 200
            fill(store)
            full = _problem(client.get("/readyz"), 503, "not-ready")
            assert full["errors"] == [{"field": "images", "detail": "cannot take a file (full)"}]
            (store / FILLER).unlink()
            remount(store, "ro")
            read_only = _problem(client.get("/readyz"), 503, "not-ready")
            assert read_only["detail"] == "not ready: images: cannot take a file (read_only)"
            remount(store, "rw")
            assert client.get("/readyz").status_code == 200
            assert sorted(store.iterdir()) == [], "the probe left a file behind"
        finally:
            monkeypatch.undo()
            get_settings.cache_clear()


def test_openapi_publishes_every_endpoint_with_its_models(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {
        "/v1/requests",
        "/v1/requests/{request_id}",
        "/v1/requests/{request_id}/image",
        "/v1/requests/{request_id}/cancel",
        "/v1/budget",
        "/healthz",
        "/readyz",
    } <= set(paths)
    models = schema["components"]["schemas"]
    assert {"RequestView", "RequestPage", "BudgetView", "ProblemDetails", "Accepted"} <= set(models)
    body = paths["/v1/requests"]["post"]["requestBody"]["content"]["application/json"]
    assert {"prompt", "callback_url", "metadata"} <= set(body["schema"]["properties"])
    assert (
        "application/problem+json" in paths["/v1/requests"]["post"]["responses"]["422"]["content"]
    )
    assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
