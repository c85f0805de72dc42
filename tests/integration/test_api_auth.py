"""API keys: made, listed and revoked with ``t2iroute keys``, kept hashed, and what each key
may see over HTTP; and ``t2iroute api`` run as a real server on a loopback port."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from typer.testing import CliRunner

from db.models import ApiKey, GenerationRequest
from db.session import session_scope
from tests.environment import SCRATCH
from tests.fault.servers import free_port
from tests.integration.test_api import Reply
from tests.services import api_server
from workers.entrypoints.cli import main as cli
from workers.entrypoints.http.app import create_app
from workers.entrypoints.http.deps import keys_required_at
from workers.settings import Settings

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Key:
    name: str
    key: str
    callback_secret: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _create(name: str, *flags: str) -> Key:
    done = CliRunner().invoke(cli.app, ["keys", "create", name, *flags])
    assert done.exit_code == 0, done.output
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    return Key(name, lines["key"], lines["callback secret"])


@pytest.fixture
def no_keys(clean_db: str) -> str:
    with session_scope(clean_db) as session:
        session.execute(text("TRUNCATE api_keys CASCADE"))
    return clean_db


@pytest.fixture
def alice(no_keys: str) -> Key:
    return _create("alice")


@pytest.fixture
def bob(no_keys: str) -> Key:
    return _create("bob")


@pytest.fixture
def admin(no_keys: str) -> Key:
    return _create("ops", "--admin")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(require_keys=True)) as client:
        yield client


def _unauthorized(reply: Reply, words: str) -> None:
    assert reply.status_code == 401, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.headers["www-authenticate"] == "Bearer"
    problem = reply.json()
    assert problem["type"] == "urn:t2iroute:problem:unauthorized"
    assert words in problem["detail"]


def test_keys_are_made_listed_and_revoked_and_only_their_hash_is_kept(
    no_keys: str, alice: Key, admin: Key
) -> None:
    assert alice.key.startswith("t2i_") and len(alice.key) > 40
    assert alice.callback_secret and alice.callback_secret != alice.key
    with session_scope(no_keys) as session:
        rows = {row.name: row for row in session.scalars(select(ApiKey))}
    assert rows["alice"].key_hash == hashlib.sha256(alice.key.encode()).hexdigest()
    assert rows["alice"].key_prefix == alice.key[:8]
    assert rows["alice"].callback_secret == alice.callback_secret
    assert (rows["alice"].is_admin, rows["ops"].is_admin) == (False, True)
    stored = " ".join(str(vars(row)) for row in rows.values())
    assert alice.key not in stored and admin.key not in stored

    runner = CliRunner()
    again = runner.invoke(cli.app, ["keys", "create", "alice"])
    assert again.exit_code == 2 and "exists already" in again.stderr
    listed = runner.invoke(cli.app, ["keys", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    assert "alice" in listed.stdout and "ops" in listed.stdout
    assert alice.key[:8] in listed.stdout and alice.key not in listed.stdout

    assert runner.invoke(cli.app, ["keys", "revoke", "alice"]).exit_code == 0
    assert runner.invoke(cli.app, ["keys", "revoke", "alice"]).exit_code == 1
    assert runner.invoke(cli.app, ["keys", "revoke", "nobody"]).exit_code == 1
    with session_scope(no_keys) as session:
        revoked = session.scalar(select(ApiKey).where(ApiKey.name == "alice"))
        assert revoked is not None and revoked.revoked_at is not None


def test_a_missing_wrong_or_revoked_key_is_a_401_problem(
    client: TestClient, clean_redis: redis.Redis, alice: Key
) -> None:
    body = {"prompt": "a lighthouse"}
    _unauthorized(client.post("/v1/requests", json=body), "an API key is required")
    _unauthorized(client.get("/v1/requests"), "an API key is required")
    _unauthorized(client.get("/v1/budget"), "an API key is required")
    wrong = {"Authorization": "Bearer t2i_not-a-key"}
    _unauthorized(client.post("/v1/requests", json=body, headers=wrong), "unknown or revoked")
    basic = {"Authorization": "Basic YWxpY2U6c2VjcmV0"}
    _unauthorized(client.get("/v1/requests", headers=basic), "an API key is required")
    both = {**alice.bearer, "X-API-Key": "t2i_another"}
    _unauthorized(client.get("/v1/requests", headers=both), "two different API keys")

    assert client.post("/v1/requests", json=body, headers=alice.bearer).status_code == 202
    as_header = {"X-API-Key": alice.key}
    assert client.get("/v1/requests", headers=as_header).status_code == 200

    assert CliRunner().invoke(cli.app, ["keys", "revoke", "alice"]).exit_code == 0
    _unauthorized(client.get("/v1/requests", headers=alice.bearer), "unknown or revoked")
    # What needs no key: the process's health, readiness, metrics and the schema.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_a_key_sees_only_its_own_requests_and_an_admin_key_sees_all(
    client: TestClient, clean_redis: redis.Redis, alice: Key, bob: Key, admin: Key
) -> None:
    mine = client.post("/v1/requests", json={"prompt": "a cat"}, headers=alice.bearer).json()
    theirs = client.post("/v1/requests", json={"prompt": "a dog"}, headers=bob.bearer).json()
    rid = mine["id"]

    assert client.get(f"/v1/requests/{rid}", headers=alice.bearer).status_code == 200
    for method, path in (
        ("GET", f"/v1/requests/{rid}"),
        ("GET", f"/v1/requests/{rid}/image"),
        ("POST", f"/v1/requests/{rid}/cancel"),
    ):
        reply = client.request(method, path, headers=bob.bearer)
        # Not found, word for word as for a request that does not exist: nothing leaks.
        assert reply.status_code == 404, (method, path, reply.text)
        assert reply.json()["detail"] == f"no request '{rid}'"
    assert client.get(f"/v1/requests/{rid}", headers=alice.bearer).json()["status"] == "queued"

    def listed(key: Key) -> set[str]:
        page = client.get("/v1/requests", headers=key.bearer).json()
        return {item["id"] for item in page["items"]}

    assert listed(alice) == {rid}
    assert listed(bob) == {theirs["id"]}
    assert listed(admin) == {rid, theirs["id"]}
    assert client.get(f"/v1/requests/{rid}", headers=admin.bearer).status_code == 200
    cancelled = client.post(f"/v1/requests/{rid}/cancel", headers=admin.bearer)
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")


def test_idempotency_keys_belong_to_their_api_key(
    client: TestClient, clean_redis: redis.Redis, settings: Settings, alice: Key, bob: Key
) -> None:
    def post(key: Key, prompt: str = "a lighthouse") -> Reply:
        headers = {**key.bearer, "Idempotency-Key": "order-1"}
        return client.post("/v1/requests", json={"prompt": prompt}, headers=headers)

    first, again = post(alice).json(), post(alice).json()
    assert first["id"] == again["id"] and not again["created"]
    # Bob's "order-1" is his own, even with another prompt: he never meets Alice's.
    other = post(bob, "a lighthouse at night")
    assert other.status_code == 202 and other.json()["created"]
    assert other.json()["id"] != first["id"]
    assert clean_redis.llen(settings.queue_route) == 2
    found = client.get(
        "/v1/requests", params={"idempotency_key": "order-1"}, headers=bob.bearer
    ).json()
    assert [item["id"] for item in found["items"]] == [other.json()["id"]]
    with session_scope(settings.database_url) as session:
        owners = session.execute(select(GenerationRequest.api_key_id)).scalars().all()
    assert len(owners) == 2 and len(set(owners)) == 2


def test_without_required_keys_a_keyless_caller_sees_all_and_a_key_is_still_held_to(
    clean_redis: redis.Redis, alice: Key
) -> None:
    with TestClient(create_app(require_keys=False)) as open_client:
        keyless = open_client.post("/v1/requests", json={"prompt": "a cat"}).json()
        keyed = open_client.post(
            "/v1/requests", json={"prompt": "a dog"}, headers=alice.bearer
        ).json()
        everything = open_client.get("/v1/requests").json()["items"]
        assert {item["id"] for item in everything} == {keyless["id"], keyed["id"]}
        own = open_client.get("/v1/requests", headers=alice.bearer).json()["items"]
        assert [item["id"] for item in own] == [keyed["id"]]
        assert (
            open_client.get(f"/v1/requests/{keyless['id']}", headers=alice.bearer).status_code
            == 404
        )
        wrong = open_client.get("/v1/requests", headers={"X-API-Key": "t2i_wrong"})
        assert wrong.status_code == 401


@pytest.mark.parametrize(
    ("mode", "host", "required"),
    [
        ("auto", "127.0.0.1", False),
        ("auto", "::1", False),
        ("auto", "localhost", False),
        ("auto", "0.0.0.0", True),
        ("auto", "10.1.2.3", True),
        ("auto", None, True),
        ("required", "127.0.0.1", True),
        ("off", "0.0.0.0", False),
    ],
)
def test_keys_are_required_off_loopback_unless_configured(
    settings: Settings, mode: str, host: str | None, required: bool
) -> None:
    configured = settings.model_copy(update={"api_auth": mode})
    assert keys_required_at(configured, host) is required


# --- a real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(database: str) -> Iterator[str]:
    """``t2iroute api`` on a free loopback port, keys required by configuration, and a budget
    Redis that nothing listens on (readiness must name it)."""
    env = {
        "T2IROUTE_API_AUTH": "required",
        "T2IROUTE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    with api_server(env=env) as base:
        yield base


def test_a_real_server_requires_keys_serves_its_own_and_reports_readiness(
    server: str, clean_redis: redis.Redis, alice: Key, bob: Key
) -> None:
    with httpx.Client(base_url=server, timeout=30) as http:
        assert (
            "required on 127.0.0.1" in (SCRATCH / f"api-{server.rsplit(':', 1)[1]}.log").read_text()
        )
        _unauthorized(http.post("/v1/requests", json={"prompt": "a cat"}), "is required")
        headers = {**alice.bearer, "Idempotency-Key": "clé-7"}
        made = http.post(
            "/v1/requests",
            json={"prompt": "a cat", "metadata": {"team": "é"}},
            headers={k.encode(): v.encode() for k, v in headers.items()},
        )
        assert made.status_code == 202, made.text
        rid = made.json()["id"]
        view = http.get(f"/v1/requests/{rid}", headers=alice.bearer).json()
        assert (view["idempotency_key"], view["metadata"]) == ("clé-7", {"team": "é"})
        assert http.get(f"/v1/requests/{rid}", headers=bob.bearer).status_code == 404

        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["content-type"] == "application/problem+json"
        assert [e["field"] for e in ready.json()["errors"]] == ["budget"]
        budget = http.get("/v1/budget", headers=alice.bearer).json()
        assert budget["buckets"] is None and "unreachable" in budget["buckets_error"]
        assert "/v1/requests/{request_id}/cancel" in http.get("/openapi.json").json()["paths"]
