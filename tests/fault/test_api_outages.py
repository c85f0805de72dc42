"""The HTTP API while what it stands on is down: the real API server (``t2iroute api``) on a
private PostgreSQL and a private Redis (broker and budget keeper) that the test stops.

A database outage is a 503 problem with ``Retry-After``, logged as one line per request,
and the API answers again once the database is back without being restarted. A broker
outage at submit is a 202 with ``enqueued: false`` (the request is durable; the sweeper
sends it), and a budget Redis outage leaves the budget readable from the database: each
logged as one line too."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from db.session import session_scope
from tests import environment
from tests.fault.servers import PostgresServer, RedisServer
from tests.services import api_server
from workers.services import keys

pytestmark = pytest.mark.fault

PROBLEM_JSON = "application/problem+json"


@dataclass
class Api:
    """The API's base URL, its log, and the servers under it."""

    url: str
    log: Path
    postgres: PostgresServer
    redis: RedisServer

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


@pytest.fixture
def api(request: pytest.FixtureRequest, postgres_template: PostgresServer) -> Iterator[Api]:
    redis_server = RedisServer(
        environment.SCRATCH / "api-outages" / request.node.name / "redis", appendonly=False
    )
    redis_server.start()
    postgres = postgres_template.copy()
    postgres.start()
    env = {
        "T2IROUTE_DATABASE_URL": postgres.url(),
        "T2IROUTE_BROKER_URL": redis_server.url(0),
        "T2IROUTE_REDIS_URL": redis_server.url(1),
        "T2IROUTE_BUDGET_BACKEND": "redis",
    }
    try:
        with api_server(env=env) as url:
            port = url.rsplit(":", 1)[1]
            yield Api(url, environment.SCRATCH / f"api-{port}.log", postgres, redis_server)
    finally:
        redis_server.stop()
        postgres.remove()


def _new_lines(api: Api, before: int, expected: int) -> list[str]:
    """The log lines written since ``before`` lines, once ``expected`` of them are there and
    nothing more comes for a moment."""
    deadline = time.monotonic() + 10
    lines = api.log_lines()[before:]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = api.log_lines()[before:]
        if len(again) == len(lines) >= expected:
            return again
        lines = again
    return lines


def _access(line: str) -> bool:
    # uvicorn's access log: 'INFO:     127.0.0.1:PORT - "GET /path HTTP/1.1" 503 ...'
    return line.startswith("INFO:") and ' HTTP/1.1" ' in line


def test_a_database_outage_is_a_503_problem_logged_once_per_request(api: Api) -> None:
    accepted = httpx.post(f"{api.url}/v1/requests", json={"prompt": "a cat"}, timeout=30)
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["id"]
    with session_scope(api.postgres.url()) as session:
        key = keys.create_key(session, "outage-test").key

    api.postgres.stop()
    calls = [
        ("POST", "/v1/requests", {"prompt": "a dog"}, {}),
        ("POST", "/v1/requests", {"prompt": "a dog"}, {"Idempotency-Key": "order-1"}),
        ("GET", f"/v1/requests/{request_id}", None, {}),
        ("GET", "/v1/requests", None, {}),
        ("GET", f"/v1/requests/{request_id}/image", None, {}),
        ("POST", f"/v1/requests/{request_id}/cancel", None, {}),
        ("GET", "/v1/budget", None, {}),
        # A key sent is checked against the database: unreachable is no 401.
        ("GET", "/v1/requests", None, {"X-API-Key": key}),
    ]
    before = len(api.log_lines())
    for method, path, body, headers in calls:
        reply = httpx.request(method, api.url + path, json=body, headers=headers, timeout=30)
        assert reply.status_code == 503, (path, reply.text)
        assert reply.headers["content-type"] == PROBLEM_JSON
        assert int(reply.headers["retry-after"]) > 0
        problem = reply.json()
        assert problem["type"] == "urn:t2iroute:problem:unavailable"
        assert problem["status"] == 503 and problem["title"]
        assert "database" in problem["detail"]
        assert [e["field"] for e in problem["errors"]] == ["database"]

    # One line of the API's own per request (uvicorn's access line aside), no traceback.
    lines = _new_lines(api, before, 2 * len(calls))
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    own = [line for line in lines if not _access(line)]
    assert len(own) == len(calls), "\n".join(lines)
    assert all("database" in line and "unreachable" in line for line in own), "\n".join(own)
    assert len(lines) == 2 * len(calls), "\n".join(lines)

    # Back without a restart of the API: pooled connections the outage broke are replaced.
    api.postgres.start()
    reply = httpx.get(f"{api.url}/v1/requests/{request_id}", timeout=30)
    assert reply.status_code == 200, reply.text
    reply = httpx.post(f"{api.url}/v1/requests", json={"prompt": "a dog"}, timeout=30)
    assert reply.status_code == 202, reply.text


def test_a_redis_outage_keeps_submits_and_the_budget_answering_logged_once(api: Api) -> None:
    api.redis.kill()
    before = len(api.log_lines())
    key = str(uuid.uuid4())
    accepted = httpx.post(
        f"{api.url}/v1/requests",
        json={"prompt": "a cat"},
        headers={"Idempotency-Key": key},
        timeout=30,
    )
    # The request is durable in the database: the sweeper sends it once the broker is back.
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["created"] and not accepted.json()["enqueued"]
    budget = httpx.get(f"{api.url}/v1/budget", timeout=30)
    assert budget.status_code == 200, budget.text
    assert budget.json()["buckets"] is None
    assert "unreachable" in budget.json()["buckets_error"]

    lines = _new_lines(api, before, 4)
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    own = [line for line in lines if not _access(line)]
    assert len(own) == 2, "\n".join(lines)
    assert "broker" in own[0] and accepted.json()["id"] in own[0], "\n".join(own)
    assert "budget" in own[1], "\n".join(own)
    assert len(lines) == 4, "\n".join(lines)
