"""Callbacks to internal addresses, at send time: a host that resolves to one when the
callback is sent is refused for good and gets nothing, and a POST goes to the address that
was checked, never to a second lookup of the name. Real Postgres, Redis and receiver on
127.0.0.1; a worker subprocess for the stored loopback URLs.

A host name is pointed at an address through ``workers.egress.resolve``, the one lookup a
callback makes; those tests make the attempt in this process (``callbacks.deliver``, what
the callback task runs), as nothing here can change what a name resolves to in a worker."""

from __future__ import annotations

import ipaddress
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from db import queries
from db.models import CallbackDelivery, CallbackState, GenerationRequest, Status
from db.session import session_scope
from tests.receiver import Receiver, receiver
from tests.services import celery_worker
from workers import egress
from workers.services.producer import submit
from workers.settings import Settings
from workers.stages import callbacks

pytestmark = pytest.mark.integration

SECRET = "addresses-secret"
# What the test environment allows (its receivers are on loopback), and an operator who
# allows nothing internal.
ALLOWING_LOOPBACK = Settings(callback_secret=SECRET)
ALLOWING_NOTHING = Settings(callback_secret=SECRET, callback_allowed_networks=[])
REBIND = "rebind.example"


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    with receiver() as running:
        yield running


def _port(hooks: Receiver) -> int:
    return int(hooks.url("/").rsplit(":", 1)[1].removesuffix("/"))


def _path() -> str:
    return f"/hooks/{uuid.uuid4()}"


def _resolving(monkeypatch: pytest.MonkeyPatch, *answers: str | Exception) -> list[tuple[str, int]]:
    """Point ``egress.resolve`` at these answers, one per lookup (an address, or an error to
    raise); the lookups it was asked for."""
    asked: list[tuple[str, int]] = []
    remaining = list(answers)

    def resolve(host: str, port: int) -> list[egress.Address]:
        asked.append((host, port))
        answer = remaining.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [ipaddress.ip_address(answer)]

    monkeypatch.setattr(egress, "resolve", resolve)
    return asked


def _ended(url: str, settings: Settings) -> str:
    """A request submitted with this callback URL, then failed: its callback is due."""
    request_id = submit("a lighthouse", callback_url=url, settings=settings).request_id
    with session_scope(settings.database_url) as session:
        assert queries.fail(session, request_id, "generate:edge: model exploded")
    return request_id


def _delivery(request_id: str) -> tuple[CallbackDelivery, list[tuple[int, int | None, str | None]]]:
    with session_scope(ALLOWING_LOOPBACK.database_url) as session:
        delivery = queries.callback_delivery(session, request_id)
        assert delivery is not None
        attempts = [
            (a.number, a.status_code, a.error)
            for a in queries.callback_attempts(session, request_id)
        ]
        return delivery, attempts


def test_a_name_that_resolves_to_loopback_when_sent_is_refused_for_good(
    hooks: Receiver,
    clean_db: str,
    clean_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: a name that is nothing internal when the request is made, and that
    answers 127.0.0.1 when the callback goes out."""
    path = _path()
    request_id = _ended(f"http://{REBIND}:{_port(hooks)}{path}", ALLOWING_NOTHING)
    asked = _resolving(monkeypatch, "127.0.0.1")

    assert callbacks.deliver(request_id, ALLOWING_NOTHING) is CallbackState.FAILED

    assert asked == [(REBIND, _port(hooks))]
    refusal = f"refused: callback host {REBIND} resolves to internal address 127.0.0.1 (loopback)"
    delivery, attempts = _delivery(request_id)
    assert attempts == [(1, None, refusal)]
    assert (delivery.state, delivery.attempts, delivery.last_error) == (
        CallbackState.FAILED,
        1,
        refusal,
    )
    time.sleep(0.3)
    assert hooks.received(path) == []


def test_a_name_whose_addresses_include_an_internal_one_is_refused(
    hooks: Receiver,
    clean_db: str,
    clean_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _path()
    request_id = _ended(f"https://{REBIND}{path}", ALLOWING_NOTHING)
    monkeypatch.setattr(
        egress,
        "resolve",
        lambda host, port: [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("::1")],
    )
    assert callbacks.deliver(request_id, ALLOWING_NOTHING) is CallbackState.FAILED
    _, attempts = _delivery(request_id)
    assert attempts == [
        (1, None, f"refused: callback host {REBIND} resolves to internal address ::1 (loopback)")
    ]


def test_a_name_that_does_not_resolve_is_a_failed_attempt_retried_later(
    clean_db: str, clean_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    request_id = _ended(f"https://{REBIND}/hook", ALLOWING_NOTHING)
    _resolving(monkeypatch, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    assert callbacks.deliver(request_id, ALLOWING_NOTHING) is CallbackState.PENDING

    delivery, attempts = _delivery(request_id)
    assert attempts == [(1, None, "the callback host does not resolve: Name or service not known")]
    assert delivery.next_attempt_at is not None


def test_a_name_no_resolver_takes_fails_for_good(clean_db: str, clean_redis: redis.Redis) -> None:
    request_id = _ended(f"https://{'a' * 64}.example/hook", ALLOWING_NOTHING)
    assert callbacks.deliver(request_id, ALLOWING_NOTHING) is CallbackState.FAILED
    _, attempts = _delivery(request_id)
    assert attempts == [(1, None, "the callback host is no valid host name")]


def test_the_post_goes_to_the_address_checked_and_names_the_host(
    hooks: Receiver,
    clean_db: str,
    clean_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With loopback allowed, the receiver gets the POST. The name is looked up once: a
    second lookup would answer an address nothing listens on (and the system's resolver
    knows no rebind.example), so the POST reached the receiver at the address checked."""
    path = _path()
    port = _port(hooks)
    request_id = _ended(f"http://{REBIND}:{port}{path}", ALLOWING_LOOPBACK)
    asked = _resolving(monkeypatch, "127.0.0.1", "10.255.255.1")

    assert callbacks.deliver(request_id, ALLOWING_LOOPBACK) is CallbackState.DELIVERED

    assert asked == [(REBIND, port)]
    [call] = hooks.received(path)
    assert call.headers["host"] == f"{REBIND}:{port}"
    assert callbacks.verify_signature(
        SECRET,
        call.headers["x-t2iroute-timestamp"],
        call.body,
        call.headers["x-t2iroute-signature"],
    )
    _, attempts = _delivery(request_id)
    assert attempts == [(1, 200, None)]


def test_the_next_checked_address_is_tried_when_one_refuses_the_connection(
    hooks: Receiver,
    clean_db: str,
    clean_redis: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host with two addresses, the first of which nothing listens on (a port of another
    loopback address): the POST goes to the second, both checked."""
    path = _path()
    port = _port(hooks)
    request_id = _ended(f"http://{REBIND}:{port}{path}", ALLOWING_LOOPBACK)
    monkeypatch.setattr(
        egress,
        "resolve",
        lambda host, port: [ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.1")],
    )
    assert callbacks.deliver(request_id, ALLOWING_LOOPBACK) is CallbackState.DELIVERED
    assert len(hooks.received(path)) == 1


def _stored(url: str) -> str:
    """A request with this callback URL as a row (one stored before callback URLs were
    checked), failed: its callback goes out from the commit."""
    request_id = str(uuid.uuid4())
    with session_scope(ALLOWING_LOOPBACK.database_url) as session:
        session.add(
            GenerationRequest(
                id=request_id,
                prompt="a lighthouse",
                width=64,
                height=64,
                seed=1,
                status=Status.ROUTED,
                callback_url=url,
            )
        )
    with session_scope(ALLOWING_LOOPBACK.database_url) as session:
        assert queries.fail(session, request_id, "generate:edge: model exploded")
    return request_id


def _wait_final(request_id: str, timeout: float = 30.0) -> CallbackDelivery:
    deadline = time.monotonic() + timeout
    while True:
        delivery, _ = _delivery(request_id)
        if delivery.state is not CallbackState.PENDING or time.monotonic() > deadline:
            return delivery
        time.sleep(0.1)


def test_a_worker_refuses_stored_urls_into_its_own_network(
    hooks: Receiver, clean_db: str, clean_redis: redis.Redis
) -> None:
    """A worker of an operator who allows nothing internal, with the system's resolver, and
    the real receiver on loopback: nothing is sent, whichever way the URL names it."""
    port = _port(hooks)
    hosts = ["127.0.0.1", "localhost", "2130706433"]
    env = {"T2IROUTE_CALLBACK_SECRET": SECRET, "T2IROUTE_CALLBACK_ALLOWED_NETWORKS": ""}
    # The callback task's queue, wherever the routes put it (maintenance, or a queue of its
    # own).
    with celery_worker("maintenance,callbacks", "callback-addresses", env=env):
        ids = [_stored(f"http://{host}:{port}/stored/{host}") for host in hosts]
        deliveries = [_wait_final(request_id) for request_id in ids]
    for host, delivery in zip(hosts, deliveries, strict=True):
        assert (delivery.state, delivery.attempts, delivery.last_error) == (
            CallbackState.FAILED,
            1,
            f"refused: callback host {host} resolves to internal address 127.0.0.1 (loopback)",
        )
    assert [r.path for r in hooks.received() if r.path.startswith("/stored/")] == []
