"""The HTTP client (``workers.entrypoints.client``, sync and async) against the real API: uvicorn
in a
subprocess on a free loopback port, with the real Postgres and Redis and Celery workers that
run the whole pipeline on the tiny models. Retries are shown against a small real HTTP proxy
in front of the API that loses the first answer.

The cancel tests come first: they need the requests to stay queued, which they do only
while no router worker runs (the pipeline's workers start with the first test that asks)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel

from db.session import session_scope
from tests.environment import SCRATCH
from tests.receiver import LoopbackServer, receiver
from tests.services import celery_worker
from workers.entrypoints import client as api_client
from workers.entrypoints.client import (
    APIError,
    AsyncClient,
    Client,
    RetryPolicy,
    WaitTimeout,
)
from workers.services import keys
from workers.stages.callbacks import verify_signature

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST_RETRY = RetryPolicy(attempts=3, backoff=0.05, max_backoff=0.2)


@pytest.fixture(scope="module")
def api(database: str) -> Iterator[str]:
    """The API under uvicorn, on a loopback socket this process binds and hands over (no
    race for a free port); its URL. Keys are required: uvicorn runs the app itself."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    log_path = SCRATCH / f"api-client-{os.getpid()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "workers.entrypoints.http.app:app",
                "--fd",
                str(listener.fileno()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=[listener.fileno()],
        )
    listener.close()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the API did not answer:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def key(database: str) -> keys.NewKey:
    with session_scope(database) as session:
        return keys.create_key(session, f"client-tests-{uuid.uuid4()}")


@pytest.fixture(scope="module")
def pipeline(tiny_models: dict[str, Path], database: str) -> Iterator[None]:
    """Workers for every stage: router, quality and callbacks; both tiers' generation."""
    with (
        celery_worker("route,quality,maintenance,callbacks", "client-router"),
        celery_worker("edge,cloud", "client-gpu"),
    ):
        yield


@pytest.fixture
def client(api: str, key: keys.NewKey) -> Iterator[Client]:
    with Client(api, api_key=key.key, retry=FAST_RETRY) as made:
        yield made


# --- before any router runs: cancel ----------------------------------------------------------


def test_cancel_ends_a_queued_request_and_its_callback_is_sent(
    client: Client, key: keys.NewKey, clean_db: str
) -> None:
    with (
        receiver() as hooks,
        celery_worker("callbacks", "client-callbacks"),
    ):
        submitted = client.submit(
            "a kite over the dunes", callback_url=hooks.url("/cancelled"), metadata={"job": 3}
        )
        cancelled = client.cancel(submitted.id)
        assert cancelled.status == "cancelled" and cancelled.final
        assert cancelled.metadata == {"job": 3}
        # A second cancel answers the same: a retried cancel is safe.
        assert client.cancel(submitted.id).status == "cancelled"
        # Sent by the API process after its commit, long before any sweep would.
        [call] = hooks.wait_for("/cancelled", 1, timeout=20)
    assert verify_signature(
        key.callback_secret,
        call.headers["x-t2iroute-timestamp"],
        call.body,
        call.headers["x-t2iroute-signature"],
    )
    assert json.loads(call.body)["state"] == "cancelled"
    assert client.get(submitted.id).status == "cancelled"


def test_wait_gives_up_with_the_request_as_last_seen(client: Client, clean_db: str) -> None:
    submitted = client.submit("a lantern in the fog")
    with pytest.raises(WaitTimeout) as caught:
        client.wait(submitted.id, timeout=0.6, poll_interval=0.1)
    assert caught.value.last.status == "queued"
    assert caught.value.status is None
    assert isinstance(caught.value, APIError) and isinstance(caught.value, TimeoutError)
    client.cancel(submitted.id)


# --- errors ------------------------------------------------------------------------------------


def test_refusals_are_raised_with_their_problem_details(
    client: Client, api: str, clean_db: str
) -> None:
    with pytest.raises(APIError) as caught:
        client.submit("   ", width=30)
    error = caught.value
    assert error.status == 422
    assert error.title == "Invalid request"
    assert error.field == "prompt"
    assert {e["field"] for e in error.errors} == {"prompt", "width"}
    assert error.type == "urn:t2iroute:problem:invalid-request"

    with pytest.raises(APIError) as caught:
        client.get(str(uuid.uuid4()))
    assert caught.value.status == 404

    with (
        Client(api, api_key="t2i_not-a-key", retry=FAST_RETRY) as stranger,
        pytest.raises(APIError) as caught,
    ):
        stranger.budget()
    assert caught.value.status == 401
    assert "unknown or revoked" in caught.value.detail


def test_no_answer_at_all_is_an_api_error_after_the_retries() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with (
        Client(f"http://127.0.0.1:{port}", retry=FAST_RETRY) as nowhere,
        pytest.raises(APIError) as caught,
    ):
        nowhere.submit("a cat")
    assert caught.value.status is None
    assert caught.value.title == "No answer"
    assert "after 3 tries" in caught.value.detail


# --- retries: a proxy that loses the first answer ---------------------------------------------


class LosingProxy(LoopbackServer):
    """Forwards every request to the API; the first ``POST /v1/requests`` is forwarded too,
    but its answer is lost on the way back: replaced by a 503 (``mode="503"``), or by a
    connection closed without an answer (``mode="drop"``). Records each POST's raw
    Idempotency-Key."""

    def __init__(self, upstream: str, mode: str) -> None:
        self.upstream = upstream
        self.mode = mode
        self.keys: list[bytes] = []
        self._lock = threading.Lock()
        super().__init__()

    def _lose(self, method: str, path: str, key: bytes | None) -> bool:
        if method != "POST" or path != "/v1/requests":
            return False
        with self._lock:
            self.keys.append(key or b"")
            return len(self.keys) == 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                # http.server decodes header bytes as latin-1: this gives the bytes back.
                raw = {
                    name.lower().encode(): value.encode("latin-1")
                    for name, value in self.headers.items()
                    if name.lower() not in ("host", "content-length", "connection")
                }
                key = raw.get(b"idempotency-key")
                answer = httpx.request(
                    self.command, proxy.upstream + self.path, headers=raw, content=body
                )
                if proxy._lose(self.command, self.path.split("?")[0], key):
                    if proxy.mode == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    answer = httpx.Response(
                        503,
                        json={"title": "Service Unavailable", "status": 503, "detail": "lost"},
                        headers={"Content-Type": "application/problem+json"},
                    )
                self.send_response(answer.status_code)
                for name, value in answer.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_a_lost_answer_is_retried_with_the_same_idempotency_key_and_makes_one_request(
    api: str, key: keys.NewKey, clean_db: str, mode: str
) -> None:
    proxy = LosingProxy(api, mode)
    try:
        with Client(proxy.url, api_key=key.key, retry=FAST_RETRY) as through:
            submitted = through.submit("a teapot on a stove", seed=5)
    finally:
        proxy.close()
    # The client made its own key, sent it twice, and the second try found the request
    # the first one had made.
    assert len(proxy.keys) == 2
    assert proxy.keys[0] == proxy.keys[1] == submitted.idempotency_key.encode()
    assert not submitted.created
    with Client(api, api_key=key.key) as direct:
        found = list(direct.list(idempotency_key=submitted.idempotency_key))
        assert [r.id for r in found] == [submitted.id]
        direct.cancel(submitted.id)


def test_a_non_ascii_idempotency_key_round_trips(client: Client, clean_db: str) -> None:
    key = f"clé-{uuid.uuid4()}"
    first = client.submit("a cat on a mat", idempotency_key=key)
    again = client.submit("a cat on a mat", idempotency_key=key)
    assert first.created and not again.created and first.id == again.id
    assert client.get(first.id).idempotency_key == key
    client.cancel(first.id)


# --- listing -----------------------------------------------------------------------------------


def test_list_follows_the_cursor_through_every_page(client: Client, clean_db: str) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    ids = [client.submit(f"a numbered bottle {i}").id for i in range(5)]
    first = client.page(page_size=2)
    assert len(first.items) == 2 and first.next is not None

    listed = list(client.list(page_size=2, created_after=before))
    assert [r.id for r in listed] == list(reversed(ids))  # newest first
    assert all(r.status == "queued" and r.url == f"/v1/requests/{r.id}" for r in listed)
    assert list(client.list(status="done")) == []
    assert list(client.list(created_before=before)) == []
    client.cancel(ids[0])
    assert [r.id for r in client.list(status="cancelled")] == [ids[0]]
    for rid in ids[1:]:
        client.cancel(rid)


# --- the whole flow ------------------------------------------------------------------------------


def test_sync_client_submits_waits_and_downloads_the_image(
    client: Client, pipeline: None, clean_db: str, tmp_path: Path
) -> None:
    submitted = client.submit("a red bicycle by a wall", seed=3, metadata={"order": 17})
    assert submitted.created and submitted.enqueued

    done = client.wait(submitted.id, timeout=180)
    assert done.status == "done" and done.final
    assert done.metadata == {"order": 17}
    assert done.decision is not None and done.answer_tier == done.decision.tier
    answer = next(g for g in done.generations if g.tier == done.answer_tier)
    assert answer.quality and len(answer.quality[0].scores) == 10

    png = client.image(submitted.id)
    assert png.startswith(PNG_MAGIC)
    assert client.image(submitted.id, tier=done.answer_tier) == png
    saved = client.save_image(submitted.id, tmp_path / "answer.png")
    assert saved.read_bytes() == png

    with pytest.raises(APIError) as caught:
        client.cancel(submitted.id)
    assert caught.value.status == 409
    assert caught.value.title == "Too late to cancel"

    budget = client.budget()
    assert budget.decisions >= 1
    assert set(budget.answers) == {"edge", "cloud"}
    assert budget.spent <= budget.allowed


def test_async_client_does_the_same(
    api: str, key: keys.NewKey, pipeline: None, clean_db: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with AsyncClient(api, api_key=key.key, retry=FAST_RETRY) as client:
            submitted = [
                await client.submit(prompt, seed=i)
                for i, prompt in enumerate(["a bowl of soup", "a castle on a hill"])
            ]
            finished = await asyncio.gather(
                *(client.wait(s.id, timeout=180, poll_interval=0.1) for s in submitted)
            )
            assert [r.status for r in finished] == ["done", "done"]
            png = await client.image(submitted[0].id)
            assert png.startswith(PNG_MAGIC)
            saved = await client.save_image(submitted[1].id, tmp_path / "castle.png")
            assert saved.read_bytes().startswith(PNG_MAGIC)
            listed = [r.id async for r in client.list(status="done", page_size=1)]
            assert listed == [s.id for s in reversed(submitted)]
            assert (await client.get(submitted[0].id)).answer_tier is not None
            assert (await client.budget(window_minutes=5)).decisions >= 2
            with pytest.raises(APIError) as caught:
                await client.submit("")
            assert caught.value.status == 422 and caught.value.field == "prompt"

    asyncio.run(scenario())


# --- the client's models are the API's ---------------------------------------------------------

MODELS: list[tuple[type[BaseModel], str]] = [
    (api_client.RequestInfo, "RequestView"),
    (api_client.Stage, "StepView"),
    (api_client.Decision, "DecisionView"),
    (api_client.Generation, "GenerationView"),
    (api_client.Quality, "QualityView"),
    (api_client.RequestSummary, "RequestSummary"),
    (api_client.Page, "RequestPage"),
    (api_client.Budget, "BudgetView"),
]


def test_the_clients_models_mirror_the_published_schema(api: str) -> None:
    """Every field of each API schema is a field of the client's model and back, so that a
    change to the API that the client does not follow fails here."""
    schemas = httpx.get(f"{api}/openapi.json").json()["components"]["schemas"]
    for model, name in MODELS:
        assert set(model.model_fields) == set(schemas[name]["properties"]), name
    accepted = set(schemas["Accepted"]["properties"])
    assert set(api_client.Submitted.model_fields) == accepted | {"idempotency_key"}
