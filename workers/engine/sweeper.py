"""The sweeper: re-send a step whose message can be shown lost, and only that.

A step with no sign of life (not sent, started or seen waiting) for ``lost_after_seconds``
is checked against the broker: if a message for it waits in a queue, or is held
unacknowledged by a worker that started it less than a task time limit ago, the step is
waiting, not stuck, and nothing is sent (a backlog
of hours fails nothing and adds no copies). If the broker holds none (a Redis restart
without persistence, a worker that died between its commit and its send, a producer that
found the broker down), the step is re-sent. A step lost ``max_resends`` times gives up.

Redis is read exactly (each queue's list and kombu's ``unacked`` hash). For a broker that
keeps no record of delivered messages (the demo's file-system broker), a running step is
taken as alive until the task time limit has passed since it started."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from db import queries
from db.models import StepStatus
from workers import stages
from workers.app.flow import Send, Step, parse_task_id
from workers.pool import Pool
from workers.services.budget import BudgetKeeper
from workers.settings import Settings

log = logging.getLogger(__name__)

# Steps checked per sweep; the rest wait for the next one.
SWEEP_LIMIT = 1000


@dataclass(frozen=True)
class BrokerView:
    """The (request id, step) of every message queued for these queues, of every message
    delivered to a worker and not yet acknowledged, and whether the broker keeps the latter
    at all."""

    queued: frozenset[tuple[str, str]]
    held: frozenset[tuple[str, str]] = frozenset()
    tracks_delivered: bool = True


def _keys(payloads: Iterable[Any]) -> frozenset[tuple[str, str]]:
    keys = set()
    for payload in payloads:
        message_id = payload.get("headers", {}).get("id") if isinstance(payload, dict) else None
        parsed = parse_task_id(message_id) if isinstance(message_id, str) else None
        if parsed is not None:
            keys.add(parsed)
    return frozenset(keys)


def read_broker(app: Celery, queues: Iterable[str]) -> BrokerView | None:
    """What the broker holds; None for a broker this cannot read."""
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        transport = connection.transport.driver_type
        if transport == "redis":
            client = channel.client
            queued = [
                json.loads(raw)
                for queue in queues
                for priority in channel.priority_steps
                for raw in client.lrange(channel._q_for_pri(queue, priority), 0, -1)
            ]
            # kombu keeps each delivered, unacknowledged message as [payload, exchange, key].
            held = [json.loads(raw)[0] for raw in client.hvals(channel.unacked_key)]
            return BrokerView(_keys(queued), _keys(held))
        if transport == "filesystem":
            folder = Path(channel.data_folder_in)
            payloads = []
            for path in folder.glob("*.msg"):
                try:
                    payloads.append(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    continue  # taken by a worker while we read
            return BrokerView(_keys(payloads), tracks_delivered=False)
    return None


def sweep(
    session: Session,
    settings: Settings,
    broker: Callable[[], BrokerView | None],
    budget: BudgetKeeper,
    pool: Pool,
) -> tuple[list[Send], list[Step]]:
    """Re-send lost steps; return the messages to send after commit, and the steps that
    gave up now (for the caller's log). ``broker`` is read only when a step is overdue.

    The statements do not grow with the steps found: the clock, the overdue steps, one claim
    of every lost step and one mark of every waiting one; only a step that gives up has
    statements of its own (rare, and it fails its request)."""
    now = queries.database_now(session)
    overdue = queries.overdue_steps(
        session, now - timedelta(seconds=settings.lost_after_seconds), limit=SWEEP_LIMIT
    )
    if not overdue:
        return [], []
    view = broker()
    if view is not None and any(not _waiting(step, view, now, settings) for step in overdue):
        # kombu pops a message off its queue and then records it as unacknowledged, in two
        # calls: a message between the two is in neither. A worker prefetching a batch is
        # often there, so a step looks lost only if a second look misses it too.
        again = broker()
        if again is not None:
            view = BrokerView(
                view.queued | again.queued,
                view.held | again.held,
                view.tracks_delivered and again.tracks_delivered,
            )
    waiting: list[int] = []
    lost: list[queries.OverdueStep] = []
    resends: list[Send] = []
    gave_up: list[Step] = []
    for step in overdue:
        if _waiting(step, view, now, settings):
            waiting.append(step.id)
        elif step.sends >= settings.max_resends:
            parsed = Step.parse(step.step)
            reason = f"{step.step}: its message was lost {step.sends} times"
            resends.extend(
                Send(step.request_id, s)
                for s in stages.give_up(session, step.request_id, parsed, reason, budget, pool)
            )
            gave_up.append(parsed)
        else:
            lost.append(step)
    claimed = queries.claim_resends(session, lost, now)
    for step in lost:
        if step.id in claimed:
            log.warning("re-sending %s of %s: its message is lost", step.step, step.request_id)
            resends.append(Send(step.request_id, Step.parse(step.step), claimed[step.id]))
    queries.mark_seen(session, waiting, now)
    return resends, gave_up


def _waiting(
    step: queries.OverdueStep, view: BrokerView | None, now: datetime, settings: Settings
) -> bool:
    key = (step.request_id, step.step)
    # No task runs past its time limit: a step started longer ago than that is not being
    # worked on, whatever the broker still holds for it (a task cancelled when the broker
    # went away leaves its message unacknowledged until the visibility timeout).
    started_recently = step.started_at is not None and step.started_at > now - timedelta(
        seconds=settings.task_time_limit + settings.lost_after_seconds
    )
    if view is not None and key in view.queued:
        return True
    if view is not None and key in view.held:
        return step.status is StepStatus.PENDING or started_recently
    if view is not None and view.tracks_delivered:
        return False
    # Without the broker's record of delivered messages, a running step is alive until its
    # time limit has passed; with no view at all, a pending one until a worker holding it
    # would have had it back (the visibility timeout).
    if step.status is StepStatus.RUNNING and started_recently:
        return True
    return view is None and step.last_sign > now - timedelta(
        seconds=settings.visibility_timeout + settings.lost_after_seconds
    )
