"""Micro-batching with a real router worker: a backlog is routed in batches (one
transaction, one forward pass, one budget round trip per batch), a lone request is not held
for a full batch, and copies of a message in one batch do the work once."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import pytest
import redis
from sqlalchemy import func, select

from db.models import Dispatch, RoutingDecision
from db.session import session_scope
from tests.services import celery_worker, flush_redis
from workers.app.celery_app import app
from workers.app.flow import ROUTE, parse_task_id, task_id
from workers.app.names import TASK_ROUTE
from workers.services.producer import submit
from workers.settings import Settings

pytestmark = pytest.mark.e2e


def _wait_routed(url: str, ids: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(url) as session:
            routed = session.scalar(
                select(func.count())
                .select_from(RoutingDecision)
                .where(RoutingDecision.request_id.in_(list(ids)))
            )
        if routed == len(ids):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{routed} of {len(ids)} requests routed in {timeout}s")


def _transactions(url: str, ids: Sequence[str]) -> int:
    """Transactions that wrote these decisions: created_at is the transaction's now()."""
    with session_scope(url) as session:
        count = session.scalar(
            select(func.count(func.distinct(RoutingDecision.created_at))).where(
                RoutingDecision.request_id.in_(list(ids))
            )
        )
    return int(count or 0)


def _backlog(count: int) -> list[str]:
    return [submit(f"a lighthouse number {i} on a cliff", seed=i).request_id for i in range(count)]


@pytest.mark.parametrize(("size", "most"), [(8, 4), (1, 24)])
def test_a_backlog_is_routed_in_batches_of_the_configured_size(
    clean_db: str, settings: Settings, size: int, most: int
) -> None:
    flush_redis(settings.broker_url, settings.redis_url)
    ids = _backlog(24)  # queued before any worker runs
    env = {"T2IROUTE_ROUTE_BATCH_SIZE": str(size), "T2IROUTE_ROUTE_BATCH_WAIT_MS": "2000"}
    with celery_worker("route", f"router{size}", env=env):
        _wait_routed(clean_db, ids, timeout=120)
    transactions = _transactions(clean_db, ids)
    # 24 messages in batches of 8 are three batches; a timer flush may split one.
    assert 24 // size <= transactions <= most
    with session_scope(clean_db) as session:
        decisions = session.scalar(
            select(func.count())
            .select_from(RoutingDecision)
            .where(RoutingDecision.request_id.in_(ids))
        )
        started = list(
            session.scalars(
                select(Dispatch.starts).where(
                    Dispatch.request_id.in_(ids), Dispatch.step == "route"
                )
            )
        )
    assert decisions == 24
    assert started == [1] * 24


def test_a_lone_request_is_not_held_for_a_full_batch(clean_db: str, settings: Settings) -> None:
    flush_redis(settings.broker_url, settings.redis_url)
    env = {"T2IROUTE_ROUTE_BATCH_SIZE": "64", "T2IROUTE_ROUTE_BATCH_WAIT_MS": "100"}
    with celery_worker("route", "lone", env=env):
        request_id = submit("a single paper boat", seed=1).request_id
        _wait_routed(clean_db, [request_id], timeout=30)


def test_copies_of_a_message_in_one_batch_do_the_work_once(
    clean_db: str, settings: Settings
) -> None:
    flush_redis(settings.broker_url, settings.redis_url)
    ids = _backlog(4)
    for _ in range(3):  # a producer retry and two broker redeliveries, say
        app.send_task(TASK_ROUTE, args=[ids[0]], task_id=task_id(ROUTE, ids[0], 1))
    env = {"T2IROUTE_ROUTE_BATCH_SIZE": "16", "T2IROUTE_ROUTE_BATCH_WAIT_MS": "2000"}
    with celery_worker("route", "copies", env=env):
        _wait_routed(clean_db, ids, timeout=120)
        with session_scope(clean_db) as session:
            steps = {
                (rid, step): starts
                for rid, step, starts in session.execute(
                    select(Dispatch.request_id, Dispatch.step, Dispatch.starts).where(
                        Dispatch.request_id.in_(ids)
                    )
                )
            }
    assert _transactions(clean_db, ids) == 1
    assert all(steps[(rid, "route")] == 1 for rid in ids)
    # Each generation step was sent once: nothing was handed on twice.
    generations = sorted(step for rid, step in steps if rid == ids[0] and step != "route")
    assert generations and _queued_steps(settings, ids[0]) == generations


def _queued_steps(settings: Settings, request_id: str) -> list[str]:
    """The step of every message for a request waiting in the tier queues (no generation
    worker runs here)."""
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        found = []
        for tier in settings.pool:
            for raw in broker.lrange(tier.queue_name, 0, -1):
                parsed = parse_task_id(json.loads(raw)["headers"]["id"])
                if parsed is not None and parsed[0] == request_id:
                    found.append(parsed[1])
        return sorted(found)
    finally:
        broker.close()
