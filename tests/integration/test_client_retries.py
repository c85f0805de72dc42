"""The client's retries against real servers: the API killed and started again a few seconds
later (``t2iroute api`` on one loopback port), ridden out by the default policy, and a small
real HTTP server that answers 500, 503 and 429 with ``Retry-After`` (in seconds and as an
HTTP date) before it accepts, sync and async. Every try of a submit carries the same
idempotency key."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler

import pytest

from tests.environment import SCRATCH
from tests.fault.servers import free_port
from tests.receiver import LoopbackServer
from tests.services import api_command, wait_api_healthy
from workers.entrypoints.client import APIError, AsyncClient, Client, RetryPolicy, Submitted

pytestmark = pytest.mark.integration

#: How long the API is down in the restart tests: longer than the old default retries
#: (1.75 to 3.5 s in all), and the restarted process takes a few seconds more to answer.
DOWN_SECONDS = 4.0


# --- the API killed and started again ----------------------------------------------------------


class RestartingApi:
    """``t2iroute api`` on one free loopback port; ``restart_after(delay)`` kills it now and
    starts it again ``delay`` seconds later, from a thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = SCRATCH / f"api-restarting-{self.port}.log"
        self.process = self._start()
        self._restarter: threading.Thread | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            return subprocess.Popen(
                api_command(self.port), stdout=log, stderr=subprocess.STDOUT, env=os.environ
            )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        wait_api_healthy(self.process, self.url, self.log, timeout)

    def restart_after(self, delay: float) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

        def start_later() -> None:
            time.sleep(delay)
            self.process = self._start()

        self._restarter = threading.Thread(target=start_later, daemon=True)
        self._restarter.start()

    def stop(self) -> None:
        if self._restarter is not None:
            self._restarter.join()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def api(clean_db: str) -> Iterator[RestartingApi]:
    running = RestartingApi()
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop()


def test_the_default_policy_rides_out_a_restart_of_the_api(api: RestartingApi) -> None:
    with Client(api.url) as client:
        before = client.submit("a cat before the restart")
        api.restart_after(DOWN_SECONDS)
        started = time.monotonic()
        during = client.submit("a cat during the restart", idempotency_key="restart-1")
        waited = time.monotonic() - started
        assert during.created and during.idempotency_key == "restart-1"
        assert waited >= DOWN_SECONDS
        assert client.get(during.id).status == "queued"
        assert client.get(before.id).prompt == "a cat before the restart"


def test_the_async_client_rides_it_out_too(api: RestartingApi) -> None:
    async def run() -> tuple[Submitted, float]:
        async with AsyncClient(api.url) as client:
            api.restart_after(DOWN_SECONDS)
            started = time.monotonic()
            during = await client.submit("a cat during the restart")
            waited = time.monotonic() - started
            assert (await client.get(during.id)).status == "queued"
            return during, waited

    during, waited = asyncio.run(run())
    assert during.created
    assert waited >= DOWN_SECONDS


# --- a server that refuses a few times with Retry-After ---------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]


@dataclass(frozen=True)
class Try:
    at: float
    key: str | None


ACCEPTED = {"id": "00000000-0000-4000-8000-000000000001", "created": True, "enqueued": True}


class Refusing(LoopbackServer):
    """A real HTTP server whose ``POST /v1/requests`` gets the scripted answers in turn (each
    computed when the request comes, so that an HTTP date is relative to then), then 202;
    records when each try came and its idempotency key."""

    def __init__(self, script: list[object]) -> None:
        self.script = list(script)
        self.tries: list[Try] = []
        self._lock = threading.Lock()
        super().__init__()

    def _next(self, key: str | None) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.tries.append(Try(time.monotonic(), key))
            step = self.script.pop(0) if self.script else None
        answer = step() if callable(step) else step
        if answer is None:
            return 202, {"Content-Type": "application/json"}, json.dumps(ACCEPTED).encode()
        assert isinstance(answer, Answer)
        problem = {"type": "about:blank", "title": "Refused", "status": answer.status}
        body = json.dumps({**problem, "detail": "try later", "errors": []}).encode()
        return answer.status, {"Content-Type": "application/problem+json", **answer.headers}, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, body = server._next(self.headers.get("Idempotency-Key"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@contextmanager
def refusing(script: list[object]) -> Iterator[Refusing]:
    server = Refusing(script)
    try:
        yield server
    finally:
        server.close()


def _in_seconds(seconds: int) -> Answer:
    return Answer(503, {"Retry-After": str(seconds)})


def _at_date(seconds_from_now: int) -> Answer:
    # An HTTP date has whole seconds: the wait it asks for is between seconds-1 and seconds.
    return Answer(429, {"Retry-After": formatdate(time.time() + seconds_from_now, usegmt=True)})


#: A 500 with no Retry-After (the backoff's wait, 0.25 to 0.5 s), a 503 asking for 1 s,
#: a 429 asking for a moment 3 s ahead (2 to 3 s), then 202.
SCRIPT: list[object] = [Answer(500, {}), _in_seconds(1), lambda: _at_date(3)]


def _check_tries(tries: list[Try], key: str) -> None:
    assert [t.key for t in tries] == [key] * 4
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(tries)]
    assert gaps[0] < 1.0
    assert gaps[1] >= 1.0
    assert gaps[2] > 1.5


def test_503_and_429_are_retried_as_retry_after_asks() -> None:
    with refusing(SCRIPT) as server, Client(server.url) as client:
        submitted = client.submit("a cat")
    assert submitted.id == ACCEPTED["id"]
    _check_tries(server.tries, submitted.idempotency_key)


def test_the_async_client_honours_them_too() -> None:
    async def run(url: str) -> Submitted:
        async with AsyncClient(url) as client:
            return await client.submit("a cat", idempotency_key="async-1")

    with refusing(SCRIPT) as server:
        submitted = asyncio.run(run(server.url))
    assert submitted.id == ACCEPTED["id"]
    _check_tries(server.tries, "async-1")


def test_a_retry_after_past_the_window_is_given_up_at_once() -> None:
    with refusing([_in_seconds(3600)]) as server, Client(server.url) as client:
        started = time.monotonic()
        with pytest.raises(APIError) as caught:
            client.submit("a cat")
        took = time.monotonic() - started
    assert caught.value.status == 503
    assert took < 1.0
    assert len(server.tries) == 1


def test_the_window_bounds_the_retries_of_a_server_that_never_answers() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with Client(closed, retry=RetryPolicy(window=3.0)) as client:
        started = time.monotonic()
        with pytest.raises(APIError) as caught:
            client.get("00000000-0000-4000-8000-000000000001")
    took = time.monotonic() - started
    assert caught.value.status is None
    assert 2.5 <= took <= 4.0
