"""The batched tasks' bodies, run in this process on the real Postgres and Redis as a worker
runs them for a batch of messages: a bad message, a gone request or a copy in a batch
changes nothing for the others, and one broken image fails only its own step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from db import queries
from db.models import Dispatch, Status, StepStatus
from db.session import session_scope
from workers.app import flow
from workers.engine import tasks
from workers.engine.batching import Delivery
from workers.services.producer import submit
from workers.settings import Settings

pytestmark = pytest.mark.integration


def _deliver(step: flow.Step, request_id: str, *, redelivered: bool = False) -> Delivery:
    return Delivery(
        task_id=flow.task_id(step, request_id, 1),
        args=tuple(step.args(request_id)),
        redelivered=redelivered,
    )


def _statuses(url: str, ids: list[str]) -> dict[str, Status]:
    with session_scope(url) as session:
        return {rid: queries.get_request(session, rid).status for rid in ids}  # type: ignore[union-attr]


def _queued_ids(client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]


def test_a_route_batch_skips_what_it_cannot_do_and_routes_the_rest_once(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    ids = [submit(f"a harbour with {i} boats", seed=i).request_id for i in range(3)]
    gone = submit("a cancelled request", seed=9).request_id
    with session_scope(clean_db) as session:
        queries.fail(session, gone, "cancelled by test")
    batch = [
        *(_deliver(flow.ROUTE, rid) for rid in ids),
        _deliver(flow.ROUTE, ids[0], redelivered=True),  # a copy in the same batch
        _deliver(flow.ROUTE, gone),
        Delivery(task_id="junk", args=("not-a-uuid",)),
        Delivery(task_id="junk2", args=()),
    ]
    tasks.route.run(batch)
    with session_scope(clean_db) as session:
        decisions = queries.get_decisions(session, [*ids, gone])
        routes = dict(
            session.execute(
                select(Dispatch.request_id, Dispatch.starts).where(Dispatch.step == "route")
            ).all()
        )
    assert set(decisions) == set(ids)
    assert all(routes[rid] == 1 for rid in ids)
    assert _statuses(clean_db, ids) == dict.fromkeys(ids, Status.ROUTED)
    # Every wanted tier's generation was sent once, to that tier's queue.
    sent = [m for tier in settings.pool for m in _queued_ids(clean_redis, tier.queue_name)]
    wanted = [
        flow.task_id(flow.generate(t), rid, 1)
        for rid in ids
        for t in queries.wanted_tiers(decisions[rid])
    ]
    assert sorted(sent) == sorted(wanted)
    # A second delivery of the whole batch is a batch of duplicates: nothing new is sent.
    clean_redis.flushdb()
    tasks.route.run(batch)
    assert not [m for tier in settings.pool for m in _queued_ids(clean_redis, tier.queue_name)]


def test_one_broken_image_in_a_score_batch_fails_only_its_own_step(
    tiny_models: dict[str, Path], clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    ids = [submit(f"a garden with {i} roses", seed=i).request_id for i in range(4)]
    tasks.route.run([_deliver(flow.ROUTE, rid) for rid in ids])
    with session_scope(clean_db) as session:
        answers = {rid: d.tier for rid, d in queries.get_decisions(session, ids).items()}
    tasks.generate_image.run([_deliver(flow.generate(answers[rid]), rid) for rid in ids])
    broken = ids[2]
    with session_scope(clean_db) as session:
        (image,) = [g for g in queries.generations_of(session, broken) if g.tier == answers[broken]]
    (settings.image_store / image.image_path).unlink()
    clean_redis.delete(settings.queue_quality)

    tasks.score.run([_deliver(flow.score(answers[rid]), rid) for rid in ids])

    statuses = _statuses(clean_db, ids)
    assert statuses.pop(broken) is Status.ROUTED
    assert set(statuses.values()) == {Status.DONE}
    with session_scope(clean_db) as session:
        (step,) = [
            s for s in queries.steps_of(session, broken) if s.step == f"score:{answers[broken]}"
        ]
    assert (step.status, step.failures) == (StepStatus.PENDING, 1)
    assert step.last_error is not None and "FileNotFoundError" in step.last_error
    # Its message is sent again under its own id, after a backoff, with the retry counted.
    (retry,) = [json.loads(raw) for raw in clean_redis.lrange(settings.queue_quality, 0, -1)]
    assert retry["headers"]["id"] == flow.task_id(flow.score(answers[broken]), broken, 1)
    assert retry["headers"]["retries"] == 1 and retry["headers"]["eta"] is not None
