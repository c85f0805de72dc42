"""One tenant's dead receiver delays no one else: callbacks have a queue and a worker of
their own (a threads pool, many sends at once), and each API key holds at most a few
attempts in flight. Real Postgres, Redis, worker subprocesses and receivers on 127.0.0.1.

The scenario of issue 18: twenty callbacks of key A to a receiver that accepts the connection
and never answers, then one of key B. B's is delivered within two seconds of being due, and
the maintenance worker runs a sweep at once meanwhile. The two figures are printed (run with
``-s`` to see them)."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import update

from db import queries
from db.models import CallbackDelivery, GenerationRequest, Status
from db.session import session_scope
from tests.receiver import Receiver, receiver
from tests.services import celery_worker
from workers.app.celery_app import app
from workers.app.flow import ROUTE
from workers.app.names import TASK_SWEEP
from workers.services import keys
from workers.services.callback_slots import give_back, sender, take
from workers.settings import Settings
from workers.stages import callbacks

pytestmark = pytest.mark.integration

A_CALLBACKS = 20
# What an operator runs for the callbacks queue (README, compose).
THREADS = 16
ENV = {
    "T2IROUTE_CALLBACK_SECRET": "fairness-secret",
    # A callback waiting longer than this with no attempt is re-sent by the sweep.
    "T2IROUTE_LOST_AFTER_SECONDS": "2",
}
# The default bound of attempts in flight per key.
SLOTS = 4
DUE_WITHIN_SECONDS = 2.0


class Silent:
    """A receiver that accepts every connection, reads what is sent and never answers;
    it counts the connections and the most open at once."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=256)
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.accepted = 0
        self.most_open = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str) -> str:
        host, port = self._server.getsockname()[:2]
        return f"http://{host}:{port}{path}"

    def open_now(self) -> int:
        with self._lock:
            return len(self._open)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._open.append(connection)
                self.most_open = max(self.most_open, len(self._open))
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection: socket.socket) -> None:
        try:
            while connection.recv(65536):
                pass
        except OSError:
            pass
        with self._lock:
            if connection in self._open:
                self._open.remove(connection)
        connection.close()

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        with self._lock:
            for connection in self._open:
                connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def silent() -> Iterator[Silent]:
    listening = Silent()
    try:
        yield listening
    finally:
        listening.close()


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    with receiver() as running:
        yield running


def _key(database: str) -> tuple[int, str]:
    """A new API key's id and callback secret."""
    with session_scope(database) as session:
        made = keys.create_key(session, f"fairness-{uuid.uuid4()}")
        key = keys.authenticate(session, made.key)
        assert key is not None
        return key.id, made.callback_secret


def _ended(database: str, url: str, key_id: int | None) -> str:
    """A request with a callback URL, failed: its callback is due at the commit, and sent
    after it (``workers.app.flow``'s after-commit listener, imported here as in every process
    that ends requests)."""
    request_id = str(uuid.uuid4())
    with session_scope(database) as session:
        session.add(
            GenerationRequest(
                id=request_id,
                prompt="a lighthouse in a storm",
                width=64,
                height=64,
                seed=1,
                status=Status.ROUTED,
                callback_url=url,
                api_key_id=key_id,
            )
        )
        session.flush()
        queries.record_steps(session, request_id, [ROUTE.key])
    with session_scope(database) as session:
        assert queries.fail(session, request_id, "generate:edge: model exploded")
    return request_id


def _lost(database: str, url: str) -> str:
    """A request without a key whose callback message was lost (its process died between
    the commit and the send), overdue: only a sweep sends it."""
    request_id = str(uuid.uuid4())
    with session_scope(database) as session:
        session.add(
            GenerationRequest(
                id=request_id,
                prompt="a kite over the dunes",
                width=64,
                height=64,
                seed=1,
                status=Status.ROUTED,
                callback_url=url,
            )
        )
        session.flush()
        queries.fail(session, request_id, "generate:edge: lost")
        assert session.info.pop(queries.CALLBACKS_TO_SEND) == [request_id]
        session.execute(
            update(CallbackDelivery)
            .where(CallbackDelivery.request_id == request_id)
            .values(next_attempt_at=queries.database_now(session) - timedelta(seconds=10))
        )
    return request_id


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def test_a_dead_receiver_of_one_key_delays_neither_another_keys_callback_nor_the_sweep(
    clean_db: str, clean_redis: redis.Redis, silent: Silent, hooks: Receiver
) -> None:
    (key_a, _), (key_b, secret_b) = _key(clean_db), _key(clean_db)
    with (
        celery_worker("maintenance", "fair-maintenance", env=ENV),
        celery_worker("callbacks", "fair-callbacks", env=ENV, pool="threads", concurrency=THREADS),
    ):
        a_ids = [_ended(clean_db, silent.url(f"/a/{i}"), key_a) for i in range(A_CALLBACKS)]
        # A's first attempts hang on the receiver that never answers.
        _until(lambda: silent.open_now() >= 1, 30, "no callback of A reached its receiver")
        time.sleep(0.5)

        b_due = time.time()
        _ended(clean_db, hooks.url("/b"), key_b)
        [b_call] = hooks.wait_for("/b", 1, timeout=30)
        b_delay = b_call.at - b_due
        assert callbacks.verify_signature(
            secret_b,
            b_call.headers["x-t2iroute-timestamp"],
            b_call.body,
            b_call.headers["x-t2iroute-signature"],
        )

        _lost(clean_db, hooks.url("/swept"))
        swept_at = time.time()
        app.send_task(TASK_SWEEP)
        [swept] = hooks.wait_for("/swept", 1, timeout=30)
        sweep_delay = swept.at - swept_at

        a_open = silent.open_now()
        print(
            f"\nB's callback delivered {b_delay:.2f} s after it was due; the sweep's callback "
            f"{sweep_delay:.2f} s after the sweep was sent; A's attempts in flight: "
            f"{a_open} now, {silent.most_open} at most, {silent.accepted} made"
        )
        assert b_delay <= DUE_WITHIN_SECONDS
        assert sweep_delay <= DUE_WITHIN_SECONDS
        assert 1 <= silent.most_open <= SLOTS
    # After the workers' warm shutdown: every attempt counted is a connection made; an A
    # callback that found its key's slots full was not counted as an attempt.
    with session_scope(clean_db) as session:
        attempts = 0
        for request_id in a_ids:
            delivery = queries.callback_delivery(session, request_id)
            assert delivery is not None
            attempts += delivery.attempts
    assert attempts == silent.accepted


def test_a_callback_that_finds_its_keys_slots_taken_makes_no_attempt_until_one_is_free(
    clean_db: str, clean_redis: redis.Redis, hooks: Receiver, settings: Settings
) -> None:
    key, _ = _key(clean_db)
    held = [take(settings, sender(key), 60.0) for _ in range(SLOTS)]
    with celery_worker("callbacks", "slot-wait", env={"T2IROUTE_CALLBACK_SECRET": "s"}):
        request_id = _ended(clean_db, hooks.url("/waits"), key)
        time.sleep(2.0)
        assert hooks.received("/waits") == []
        with session_scope(clean_db) as session:
            delivery = queries.callback_delivery(session, request_id)
            assert delivery is not None and delivery.attempts == 0, "waiting is no attempt"

        freed = held.pop()
        assert freed is not None
        give_back(settings, freed)
        [call] = hooks.wait_for("/waits", 1, timeout=10)
    assert call.headers["x-t2iroute-attempt"] == "1"
    with session_scope(clean_db) as session:
        assert [
            (a.number, a.status_code) for a in queries.callback_attempts(session, request_id)
        ] == [(1, 200)]
