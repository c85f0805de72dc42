"""The producer against the real Postgres and Redis broker: accepted requests are durable
and enqueued once; refused ones leave no row and no message."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from db.models import GenerationRequest, Status
from db.session import session_scope
from workers.services.producer import InvalidRequest, describe, submit
from workers.settings import Settings

pytestmark = pytest.mark.integration


def _rows(url: str) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(GenerationRequest)) or 0)


def test_submit_writes_the_request_and_enqueues_only_its_id(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    result = submit("a red apple on a white table", seed=7)
    assert result.created and result.enqueued
    info = describe(result.request_id)
    assert info is not None and info["status"] == Status.QUEUED.value
    raw = clean_redis.lrange(settings.queue_route, 0, -1)
    messages = [m.decode() if isinstance(m, bytes) else m for m in raw]
    assert len(messages) == 1
    assert result.request_id in messages[0]
    assert "apple" not in messages[0]  # the prompt stays in Postgres


def test_same_idempotency_key_gives_one_request_and_one_job(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    first = submit("a lighthouse at dusk", idempotency_key="client-42", seed=1)
    second = submit("a lighthouse at dusk", idempotency_key="client-42", seed=1)
    assert first.request_id == second.request_id
    assert first.created and not second.created
    assert clean_redis.llen(settings.queue_route) == 1
    assert _rows(clean_db) == 1


def test_reused_idempotency_key_with_other_parameters_is_refused(
    clean_db: str, clean_redis: redis.Redis
) -> None:
    submit("a lighthouse at dusk", idempotency_key="client-43")
    with pytest.raises(InvalidRequest, match="used before with other prompt"):
        submit("a lighthouse at noon", idempotency_key="client-43")


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        ("", {}, "prompt is empty"),
        ("   \n ", {}, "prompt is empty"),
        ("x" * 5000, {}, "limit is"),
        ("bad \udcff surrogate", {}, "UTF-8"),
        ("nul \x00 byte", {}, "control characters"),
        ("fine", {"width": 30}, "multiple of 8"),
        ("fine", {"height": 4096}, "multiple of 8"),
        ("fine", {"steps": 0}, "steps"),
        ("fine", {"seed": -1}, "seed"),
        ("fine", {"guidance_scale": 99.0}, "guidance_scale"),
        ("fine", {"tier": "cloud"}, "tier"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written_or_enqueued(
    clean_db: str,
    clean_redis: redis.Redis,
    settings: Settings,
    prompt: str,
    options: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        submit(prompt, **options)
    assert _rows(clean_db) == 0
    assert clean_redis.llen(settings.queue_route) == 0


def test_broker_down_keeps_the_request_queued_for_the_sweeper(clean_db: str) -> None:
    env = {**os.environ, "T2IROUTE_BROKER_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli.main", "submit", "a cup of coffee"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    request_id = done.stdout.strip().splitlines()[-1]
    with session_scope(clean_db) as session:
        row = session.get(GenerationRequest, request_id)
        assert row is not None and row.status is Status.QUEUED


def test_cli_refuses_bad_input_with_a_clear_message(clean_db: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli.main", "submit", "   "],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "prompt is empty" in done.stdout + done.stderr
    assert _rows(clean_db) == 0
