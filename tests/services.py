"""Real services for integration tests: a fresh Postgres database, clean Redis numbers,
and Celery workers started as subprocesses of the t2iroute CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import redis

from tests.environment import POSTGRES_ADMIN_URL, SCRATCH, TEST_DATABASE
from tests.fault.servers import free_port
from workers.entrypoints.demo import worker_command


def recreate_database(name: str = TEST_DATABASE) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(*urls: str) -> None:
    for url in urls:
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()


@contextmanager
def celery_worker(
    queues: str,
    name: str,
    *,
    env: dict[str, str] | None = None,
    tiers: str = "",
    pool: str = "solo",
    concurrency: int = 1,
    ready_timeout: float = 120.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process, up (answering ping) before the block runs, stopped after."""
    from workers.app.celery_app import app

    log_path = SCRATCH / f"worker-{name}-{os.getpid()}.log"
    hostname = f"{name}-{os.getpid()}@test"
    command = worker_command(queues, hostname=hostname, tiers=tiers, pool=pool)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, f"--concurrency={concurrency}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        _wait_ready(app, hostname, process, log_path, ready_timeout)
        yield process
    finally:
        stop(process)


def api_command(port: int) -> list[str]:
    """``t2iroute api`` on loopback at ``port``, as this interpreter runs it."""
    cli = "workers.entrypoints.cli.main"
    return [sys.executable, "-m", cli, "api", "--host", "127.0.0.1", "--port", str(port)]


def wait_api_healthy(
    process: subprocess.Popen[bytes], base: str, log_path: Path, timeout: float
) -> None:
    """Until the API at ``base`` answers ``/healthz``; raises, with its log, if it exits or
    does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.3)


@contextmanager
def api_server(*, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[str]:
    """``t2iroute api`` on a free loopback port, answering ``/healthz`` before the block runs,
    stopped after; its base URL. Its output is in ``SCRATCH / "api-PORT.log"``."""
    port = free_port()
    log_path = SCRATCH / f"api-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            api_command(port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_api_healthy(process, base, log_path, timeout)
        yield base
    finally:
        stop(process)


def _wait_ready(
    app: object, hostname: str, process: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{log.read_text()[-4000:]}")
        replies = app.control.ping(destination=[hostname], timeout=0.5)  # type: ignore[attr-defined]
        if replies:
            return
    raise TimeoutError(f"worker {hostname} not ready:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_final(request_ids: Sequence[str], timeout: float) -> dict[str, str]:
    """Poll the database until every request is done or failed; return their states."""
    from db.models import GenerationRequest
    from db.session import session_scope
    from workers.settings import get_settings

    deadline = time.monotonic() + timeout
    while True:
        with session_scope(get_settings().database_url) as session:
            rows = session.query(GenerationRequest.id, GenerationRequest.status).filter(
                GenerationRequest.id.in_(list(request_ids))
            )
            states = {rid: status.value for rid, status in rows}
        if all(states.get(r) in ("done", "failed") for r in request_ids):
            return states
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests not final after {timeout}s: {states}")
        time.sleep(0.3)


def wait_until_steps_closed(request_ids: Sequence[str], timeout: float) -> None:
    """Poll until no step of these requests is open: exploration steps go on after their
    request is done."""
    from sqlalchemy import func, select

    from db.models import OPEN_STEP_STATUSES, Dispatch
    from db.session import session_scope
    from workers.settings import get_settings

    deadline = time.monotonic() + timeout
    while True:
        with session_scope(get_settings().database_url) as session:
            still_open = session.scalar(
                select(func.count())
                .select_from(Dispatch)
                .where(
                    Dispatch.request_id.in_(list(request_ids)),
                    Dispatch.status.in_(OPEN_STEP_STATUSES),
                )
            )
        if not still_open:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{still_open} steps still open after {timeout}s")
        time.sleep(0.3)
