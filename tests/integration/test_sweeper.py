"""The sweeper on the real Postgres and Redis broker: a waiting message is never copied,
a lost one is re-sent, and one lost too often gives up with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import event, text

from db import queries
from db.models import Status, StepStatus
from db.session import get_engine, session_scope
from workers.app import flow
from workers.app.celery_app import app, create_app
from workers.app.flow import Send
from workers.engine.sweeper import BrokerView, read_broker, sweep
from workers.services.budget import budget_keeper_from_settings
from workers.services.producer import submit
from workers.settings import Settings

pytestmark = pytest.mark.integration


def _age(url: str, request_id: str, seconds: int) -> None:
    """Make every step of a request look sent ``seconds`` ago, with no sign of life since."""
    with session_scope(url) as session:
        session.execute(
            text(
                "UPDATE dispatches SET dispatched_at = now() - make_interval(secs => :s),"
                " seen_at = NULL, started_at = NULL WHERE request_id = :id"
            ),
            {"s": seconds, "id": request_id},
        )


def _sweep(url: str, settings: Settings) -> list[Send]:
    with session_scope(url) as session:
        resends, _ = sweep(
            session,
            settings,
            lambda: read_broker(app, settings.queues.values()),
            budget_keeper_from_settings(settings),
            settings.pool,
        )
    return resends


def _counted_sweep(url: str, settings: Settings) -> tuple[list[Send], int]:
    """A sweep, and the number of statements it sent to the database."""
    sent: list[str] = []

    def catch(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(get_engine(url), "before_cursor_execute", catch)
    try:
        return _sweep(url, settings), len(sent)
    finally:
        event.remove(get_engine(url), "before_cursor_execute", catch)


def _queued(client: redis.Redis, settings: Settings) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(settings.queue_route, 0, -1)]


def test_fresh_steps_are_left_alone(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    submit("a boat", seed=0)
    clean_redis.flushdb()  # even a lost message is not lost before lost_after_seconds
    assert _sweep(clean_db, settings) == []


def test_a_message_waiting_in_the_queue_is_never_copied(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a boat", seed=0).request_id
    for _ in range(3):
        _age(clean_db, request_id, 10 * settings.lost_after_seconds)
        assert _sweep(clean_db, settings) == []
    assert _queued(clean_redis, settings) == [flow.task_id(flow.ROUTE, request_id, 1)]
    with session_scope(clean_db) as session:
        (route,) = queries.steps_of(session, request_id)
        assert route.seen_at is not None and route.sends == 1


def test_a_message_held_unacknowledged_by_a_worker_is_waiting(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a boat", seed=0).request_id
    # What kombu does when it delivers a message with acks late: the queue's copy moves to
    # the ``unacked`` hash as [payload, exchange, routing key] until the ack.
    (raw,) = clean_redis.lrange(settings.queue_route, 0, -1)
    clean_redis.delete(settings.queue_route)
    clean_redis.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", settings.queue_route]))
    _age(clean_db, request_id, 10 * settings.lost_after_seconds)
    assert _sweep(clean_db, settings) == []
    # Started, and still within the time limit: being worked on.
    with session_scope(clean_db) as session:
        queries.start_step(session, request_id, "route", redelivered=False)
        session.execute(
            text(
                "UPDATE dispatches SET started_at = now() - make_interval(secs => :s),"
                " dispatched_at = now() - make_interval(secs => :s), seen_at = NULL"
            ),
            {"s": settings.lost_after_seconds + 1},
        )
    assert _sweep(clean_db, settings) == []
    # Started longer ago than any task may run: whatever holds the message is gone (a task
    # cancelled when the broker dropped leaves it unacknowledged until the visibility
    # timeout), so the step is re-sent rather than left waiting for that.
    with session_scope(clean_db) as session:
        session.execute(
            text(
                "UPDATE dispatches SET seen_at = NULL,"
                " started_at = now() - make_interval(secs => :s)"
            ),
            {"s": settings.task_time_limit + settings.lost_after_seconds + 1},
        )
    assert _sweep(clean_db, settings) == [Send(request_id, flow.ROUTE, 2)]


def test_a_lost_message_is_re_sent_once(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a boat", seed=0).request_id
    clean_redis.flushdb()  # a broker restart without persistence
    _age(clean_db, request_id, settings.lost_after_seconds + 1)
    assert _sweep(clean_db, settings) == [Send(request_id, flow.ROUTE, 2)]
    # The re-sent step is fresh again: the next sweep adds nothing.
    assert _sweep(clean_db, settings) == []


def test_a_step_lost_too_often_fails_its_request_with_the_reason(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a boat", seed=0).request_id
    for number in range(2, settings.max_resends + 1):
        clean_redis.flushdb()
        _age(clean_db, request_id, settings.lost_after_seconds + 1)
        assert _sweep(clean_db, settings) == [Send(request_id, flow.ROUTE, number)]
    clean_redis.flushdb()
    _age(clean_db, request_id, settings.lost_after_seconds + 1)
    assert _sweep(clean_db, settings) == []
    with session_scope(clean_db) as session:
        request = queries.get_request(session, request_id)
        assert request is not None and request.status is Status.FAILED
        assert request.failure_reason == f"route: its message was lost {settings.max_resends} times"
        assert queries.step_status(session, request_id, "route") is StepStatus.ABANDONED


def test_a_sweep_sends_as_many_statements_for_many_lost_steps_as_for_one(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    """The clock, the overdue steps, one claim of every lost step, one mark of every waiting
    step: four statements, whether one step is lost or five."""
    counts = []
    for lost in (1, 5):
        clean_redis.flushdb()
        ids = [submit(f"a boat {lost} {i}", seed=i).request_id for i in range(lost)]
        clean_redis.flushdb()  # their messages are lost
        waiting = submit(f"a cat {lost}", seed=0).request_id
        for request_id in (*ids, waiting):
            _age(clean_db, request_id, settings.lost_after_seconds + 1)
        resends, statements = _counted_sweep(clean_db, settings)
        assert sorted(resends, key=lambda s: s.request_id) == sorted(
            (Send(request_id, flow.ROUTE, 2) for request_id in ids), key=lambda s: s.request_id
        )
        counts.append(statements)
    assert counts == [4, 4]


def test_a_step_touched_since_the_sweep_read_it_is_not_re_sent(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    """The claim is a compare-and-set on each step's status, starts and sends: a step that a
    worker started, or that another sweeper claimed, since it was read is not lost."""
    started, claimed, lost = (submit(f"a boat {i}", seed=i).request_id for i in range(3))
    clean_redis.flushdb()
    for request_id in (started, claimed, lost):
        _age(clean_db, request_id, settings.lost_after_seconds + 1)
    with session_scope(clean_db) as session:
        now = queries.database_now(session)
        read = {s.request_id: s for s in queries.overdue_steps(session, now, limit=10)}
    assert set(read) == {started, claimed, lost}
    with session_scope(clean_db) as session:
        assert queries.start_step(session, started, "route", redelivered=False)
        assert queries.claim_resends(session, [read[claimed]], now) == {read[claimed].id: 2}
    with session_scope(clean_db) as session:
        assert queries.claim_resends(session, list(read.values()), now) == {read[lost].id: 2}
        assert [s.sends for s in queries.steps_of(session, claimed)] == [2]
        assert [s.status for s in queries.steps_of(session, started)] == [StepStatus.RUNNING]


def test_without_a_record_of_delivered_messages_a_running_step_lives_its_time_limit(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    """The demo's file-system broker forgets a message once a worker takes it."""
    request_id = submit("a boat", seed=0).request_id
    with session_scope(clean_db) as session:
        queries.start_step(session, request_id, "route", redelivered=False)
    _age(clean_db, request_id, settings.lost_after_seconds + 1)
    with session_scope(clean_db) as session:
        session.execute(
            text("UPDATE dispatches SET started_at = now() - make_interval(secs => :s)"),
            {"s": settings.lost_after_seconds + 1},
        )
    forgetful = BrokerView(frozenset(), tracks_delivered=False)
    budget = budget_keeper_from_settings(settings)
    with session_scope(clean_db) as session:
        assert sweep(session, settings, lambda: forgetful, budget, settings.pool) == ([], [])
    _age(clean_db, request_id, settings.task_time_limit + settings.lost_after_seconds + 1)
    with session_scope(clean_db) as session:
        resends, _ = sweep(session, settings, lambda: forgetful, budget, settings.pool)
    assert resends == [Send(request_id, flow.ROUTE, 2)]


def test_the_file_system_broker_is_read_too(tmp_path: Path, settings: Settings) -> None:
    """The demo's broker: a message waiting in its folder is seen, and nothing is known of
    delivered ones."""
    folder_settings = settings.model_copy(
        update={"broker_url": "filesystem://", "broker_folder": tmp_path}
    )
    files_app = create_app(folder_settings)
    flow.send(files_app, [Send("7f0c1a9e-0000-4000-8000-000000000001", flow.ROUTE, 3)])
    view = read_broker(files_app, folder_settings.queues.values())
    assert view == BrokerView(
        frozenset({("7f0c1a9e-0000-4000-8000-000000000001", "route")}), tracks_delivered=False
    )
