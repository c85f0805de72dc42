"""Callbacks against a real HTTP receiver on 127.0.0.1, with the real Postgres, Redis and a
Celery worker on the callbacks queue making the POSTs.

Requests are ended here by the query functions the pipeline and the API end them with
(``fail``, the final ``transition_many``, ``cancel``); the callback goes out from the commit
of that transaction. The end-to-end suite ends them through the pipeline itself."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from db import queries
from db.models import (
    CallbackDelivery,
    CallbackState,
    GenerationRequest,
    RoutingDecision,
    Status,
)
from db.session import session_scope
from tests.receiver import Received, Receiver, receiver
from tests.services import celery_worker
from workers.app.celery_app import app
from workers.app.flow import ROUTE, send_callbacks
from workers.app.names import TASK_SWEEP
from workers.services import keys
from workers.settings import Settings, get_settings
from workers.stages import callbacks

pytestmark = pytest.mark.integration

SECRET = "test-server-secret"
MAX_ATTEMPTS = 3
CALLBACK_ENV = {
    "T2IROUTE_CALLBACK_SECRET": SECRET,
    "T2IROUTE_CALLBACK_BACKOFF_SECONDS": "0.2",
    "T2IROUTE_CALLBACK_BACKOFF_MAX_SECONDS": "1",
    "T2IROUTE_CALLBACK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "T2IROUTE_LOST_AFTER_SECONDS": "2",
    "T2IROUTE_CALLBACK_TIMEOUT_SECONDS": "3",
}


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    with receiver() as running:
        yield running


@pytest.fixture(scope="module")
def worker(database: str) -> Iterator[None]:
    """One solo worker on the callbacks queue: it takes messages in the order sent."""
    with celery_worker("callbacks", "callbacks", env=CALLBACK_ENV):
        yield


def _db() -> str:
    return get_settings().database_url


def _path() -> str:
    return f"/hooks/{uuid.uuid4()}"


def _new_request(
    url: str,
    *,
    status: Status = Status.ROUTED,
    key_id: int | None = None,
    metadata: dict[str, Any] | None = None,
    tier: str | None = None,
) -> str:
    """A request with a callback URL, as the producer writes it (and its routing decision
    when ``tier`` is given)."""
    request_id = str(uuid.uuid4())
    with session_scope(_db()) as session:
        session.add(
            GenerationRequest(
                id=request_id,
                prompt="a lighthouse in a storm",
                width=64,
                height=64,
                seed=1,
                status=status,
                callback_url=url,
                client_metadata=metadata,
                api_key_id=key_id,
            )
        )
        session.flush()
        queries.record_steps(session, request_id, [ROUTE.key])
        if tier is not None:
            session.add(
                RoutingDecision(
                    request_id=request_id,
                    router_version="baseline:noun_count",
                    predicted_quality={"edge": 0.5, "cloud": 0.6},
                    tradeoff=0.01,
                    wanted_tier=tier,
                    tier=tier,
                    budget_reason="granted",
                )
            )
    return request_id


def _fail(request_id: str, reason: str = "generate:edge: model exploded") -> None:
    with session_scope(_db()) as session:
        assert queries.fail(session, request_id, reason)


def _wait_state(request_id: str, state: CallbackState, timeout: float = 30.0) -> CallbackDelivery:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(_db()) as session:
            delivery = queries.callback_delivery(session, request_id)
        if delivery is not None and delivery.state is state:
            return delivery
        if time.monotonic() > deadline:
            raise TimeoutError(f"callback of {request_id}: {delivery and delivery.state}")
        time.sleep(0.1)


def _attempts(request_id: str) -> list[tuple[int, int | None, str | None]]:
    with session_scope(_db()) as session:
        return [
            (a.number, a.status_code, a.error)
            for a in queries.callback_attempts(session, request_id)
        ]


def _verifies(received: Received, secret: str) -> bool:
    return callbacks.verify_signature(
        secret,
        received.headers["x-t2iroute-timestamp"],
        received.body,
        received.headers["x-t2iroute-signature"],
    )


def test_a_failed_request_is_called_back_with_a_signed_body(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    path = _path()
    request_id = _new_request(hooks.url(path), metadata={"order": 17, "note": "clé"})
    _fail(request_id)

    [call] = hooks.wait_for(path, 1, timeout=30)
    assert call.method == "POST"
    assert call.headers["content-type"] == "application/json"
    assert call.headers["x-t2iroute-attempt"] == "1"
    assert _verifies(call, SECRET)
    assert not _verifies(call, "another secret")
    tampered = Received(call.method, call.path, call.headers, call.body + b" ", call.at)
    assert not _verifies(tampered, SECRET)
    body = json.loads(call.body)
    assert body["request_id"] == request_id
    assert body["state"] == "failed"
    assert body["reason"] == "generate:edge: model exploded"
    assert body["tier"] is None and body["image_url"] is None
    assert body["metadata"] == {"order": 17, "note": "clé"}
    assert body["finished_at"]

    delivery = _wait_state(request_id, CallbackState.DELIVERED)
    assert delivery.attempts == 1
    assert delivery.last_status == 200
    assert delivery.delivered_at is not None
    assert _attempts(request_id) == [(1, 200, None)]


def test_a_done_request_names_its_answer_tier_and_image(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    path = _path()
    request_id = _new_request(hooks.url(path), tier="cloud")
    with session_scope(clean_db) as session:
        moved = queries.transition_many(
            session, [request_id], from_status=Status.ROUTED, to_status=Status.DONE
        )
        assert moved == {request_id}

    [call] = hooks.wait_for(path, 1, timeout=30)
    assert _verifies(call, SECRET)
    body = json.loads(call.body)
    assert body["state"] == "done"
    assert body["reason"] is None
    assert body["tier"] == "cloud"
    assert body["image_url"] == f"/v1/requests/{request_id}/image"
    assert body["metadata"] is None
    _wait_state(request_id, CallbackState.DELIVERED)


def test_a_cancelled_request_is_called_back(hooks: Receiver, worker: None, clean_db: str) -> None:
    path = _path()
    request_id = _new_request(hooks.url(path), status=Status.QUEUED)
    with session_scope(clean_db) as session:
        cancellation = queries.cancel(session, request_id, early_steps=[ROUTE.key])
        assert cancellation is not None and cancellation.status is Status.CANCELLED

    [call] = hooks.wait_for(path, 1, timeout=30)
    assert _verifies(call, SECRET)
    assert json.loads(call.body)["state"] == "cancelled"
    _wait_state(request_id, CallbackState.DELIVERED)


def test_a_request_made_with_an_api_key_is_signed_with_that_keys_secret(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    with session_scope(clean_db) as session:
        made = keys.create_key(session, f"callbacks-{uuid.uuid4()}")
        key = keys.authenticate(session, made.key)
        assert key is not None
        key_id = key.id
    path = _path()
    request_id = _new_request(hooks.url(path), key_id=key_id)
    _fail(request_id)

    [call] = hooks.wait_for(path, 1, timeout=30)
    assert _verifies(call, made.callback_secret)
    assert not _verifies(call, SECRET)


def test_a_receiver_failing_twice_gets_one_acknowledged_delivery_after_three_attempts(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    path = _path()
    hooks.script(path, [500, 500, 200])
    request_id = _new_request(hooks.url(path))
    _fail(request_id)

    calls = hooks.wait_for(path, 3, timeout=30)
    delivery = _wait_state(request_id, CallbackState.DELIVERED)
    assert delivery.attempts == 3
    assert _attempts(request_id) == [(1, 500, "HTTP 500"), (2, 500, "HTTP 500"), (3, 200, None)]
    assert [c.headers["x-t2iroute-attempt"] for c in calls] == ["1", "2", "3"]
    assert all(_verifies(c, SECRET) for c in calls)
    assert len({c.body for c in calls}) == 1, "every attempt carries the same event"
    # Retries were spaced by the backoff, and nothing follows the acknowledged one.
    assert calls[1].at - calls[0].at >= 0.1
    time.sleep(2.0)
    assert len(hooks.received(path)) == 3


def test_a_duplicate_message_after_delivery_does_not_post_again(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    path = _path()
    request_id = _new_request(hooks.url(path))
    _fail(request_id)
    hooks.wait_for(path, 1, timeout=30)
    _wait_state(request_id, CallbackState.DELIVERED)

    # The same message twice more (a broker redelivery, a sweep racing the first), then
    # another request's callback behind them: the solo worker takes them in order.
    send_callbacks([request_id, request_id])
    sentinel_path = _path()
    _fail(_new_request(hooks.url(sentinel_path)))
    hooks.wait_for(sentinel_path, 1, timeout=30)

    assert len(hooks.received(path)) == 1
    assert _attempts(request_id) == [(1, 200, None)]


def test_a_message_arriving_while_an_attempt_is_in_flight_sends_nothing(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    """Two workers: while one waits on a slow receiver, the other takes duplicates of the
    message and finds the attempt claimed."""
    path = _path()
    hooks.script(path, [200], delay=1.5)
    with celery_worker("callbacks", "callbacks-second", env=CALLBACK_ENV):
        request_id = _new_request(hooks.url(path))
        _fail(request_id)
        send_callbacks([request_id, request_id, request_id])
        _wait_state(request_id, CallbackState.DELIVERED, timeout=30)
        time.sleep(1.0)
    assert len(hooks.received(path)) == 1
    assert _attempts(request_id) == [(1, 200, None)]


def test_a_receiver_that_never_succeeds_fails_after_the_last_attempt(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    path = _path()
    hooks.script(path, [503] * 10)
    request_id = _new_request(hooks.url(path))
    _fail(request_id)

    delivery = _wait_state(request_id, CallbackState.FAILED)
    assert delivery.attempts == MAX_ATTEMPTS
    assert delivery.last_status == 503
    assert delivery.last_error == f"HTTP 503 (gave up after {MAX_ATTEMPTS} attempts)"
    assert delivery.delivered_at is None
    assert [n for n, _, _ in _attempts(request_id)] == list(range(1, MAX_ATTEMPTS + 1))
    time.sleep(1.5)
    assert len(hooks.received(path)) == MAX_ATTEMPTS


def test_a_receiver_slower_than_the_timeout_is_an_attempt_without_answer(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    path = _path()
    hooks.script(path, [200], delay=6.0)
    request_id = _new_request(hooks.url(path))
    _fail(request_id)

    _wait_state(request_id, CallbackState.DELIVERED)
    assert _attempts(request_id) == [(1, None, "no answer within 3 s"), (2, 200, None)]
    calls = hooks.received(path)
    assert len(calls) == 2
    assert 3.0 <= calls[1].at - calls[0].at < 5.5


def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(
    hooks: Receiver, worker: None, clean_db: str
) -> None:
    path, elsewhere = _path(), _path()
    hooks.script(path, [307, 200], headers={"Location": hooks.url(elsewhere)})
    request_id = _new_request(hooks.url(path))
    _fail(request_id)

    _wait_state(request_id, CallbackState.DELIVERED)
    assert _attempts(request_id) == [
        (1, 307, "HTTP 307: redirects are not followed"),
        (2, 200, None),
    ]
    assert hooks.received(elsewhere) == []


def test_a_url_that_is_not_http_fails_without_an_attempt_on_the_network(
    worker: None, clean_db: str
) -> None:
    request_id = _new_request("file:///etc/passwd")
    _fail(request_id)
    delivery = _wait_state(request_id, CallbackState.FAILED)
    assert delivery.attempts == 1
    assert delivery.last_status is None
    assert delivery.last_error is not None and "not an http or https URL" in delivery.last_error


def test_a_request_without_a_callback_url_has_no_delivery(clean_db: str) -> None:
    request_id = str(uuid.uuid4())
    with session_scope(clean_db) as session:
        session.add(
            GenerationRequest(
                id=request_id, prompt="a cat", width=64, height=64, seed=1, status=Status.ROUTED
            )
        )
    _fail(request_id)
    with session_scope(clean_db) as session:
        assert queries.callback_delivery(session, request_id) is None


def test_a_rolled_back_end_records_and_sends_nothing(hooks: Receiver, clean_db: str) -> None:
    path = _path()
    request_id = _new_request(hooks.url(path))
    with pytest.raises(RuntimeError), session_scope(clean_db) as session:
        queries.fail(session, request_id, "never committed")
        raise RuntimeError("the task broke before its commit")
    with session_scope(clean_db) as session:
        assert queries.callback_delivery(session, request_id) is None
        request = queries.get_request(session, request_id)
        assert request is not None and request.status is Status.ROUTED
        assert queries.CALLBACKS_TO_SEND not in session.info


def test_a_callback_whose_message_was_lost_is_sent_by_the_sweep(
    hooks: Receiver, worker: None, clean_db: str, settings: Settings
) -> None:
    """The process that ended the request died between its commit and its send: the
    delivery is pending with no message. The sweep task, on the maintenance worker, finds it
    overdue and sends it to the callbacks worker."""
    path = _path()
    request_id = _new_request(hooks.url(path))
    with session_scope(clean_db) as session:
        queries.fail(session, request_id, "generate:edge: lost")
        # What the after-commit send would have taken: gone with the process.
        assert session.info.pop(queries.CALLBACKS_TO_SEND) == [request_id]
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.request_id == request_id)
            .values(next_attempt_at=queries.database_now(session) - timedelta(seconds=10))
        )
    time.sleep(0.5)
    assert hooks.received(path) == []

    with celery_worker("maintenance", "callbacks-sweeper", env=CALLBACK_ENV):
        app.send_task(TASK_SWEEP)
        [call] = hooks.wait_for(path, 1, timeout=30)
    assert _verifies(call, SECRET)
    _wait_state(request_id, CallbackState.DELIVERED)
    assert _attempts(request_id) == [(1, 200, None)]
