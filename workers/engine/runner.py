"""The step runner: how a worker runs a batch of deliveries of one task. A delivery whose
step is closed is a duplicate and does nothing; only a failure (the stage raised, or a
worker died holding the message) counts as an attempt, and after ``max_attempts`` the step
gives up (``stages.give_up``). An outage (a database or Redis connection, the broker, an
image store that cannot take a file) is retried with backoff, never counted as an attempt."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence

import redis.exceptions
import sqlalchemy.exc
from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.orm import Session

from db import queries
from db.queries import StepStart
from db.session import session_scope
from workers import stages
from workers.app import flow
from workers.app.flow import Step
from workers.app.names import TASK_GENERATE, TASK_ROUTE
from workers.engine.batching import Delivery
from workers.pool import Pool
from workers.services import telemetry
from workers.services.images import StoreUnavailable
from workers.services.runtime import budget_keeper
from workers.settings import Settings

__all__ = [
    "TRANSIENT_ERRORS",
    "StepKey",
    "Work",
    "failure_backoff",
    "run_steps",
    "transient_backoff",
]

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
    ConnectionError,
    # A full, over-quota or read-only image store: no attempt of the request's can mend it,
    # and failing attempts would open the tier's breaker for a fault of neither.
    StoreUnavailable,
)


def transient_backoff(retries: int, settings: Settings, *, endless: bool = False) -> float | None:
    """Seconds before retry ``retries + 1`` after an outage, or None once the
    retries have covered ``transient_retry_seconds`` (never, when ``endless``). Exponential,
    capped below the visibility timeout (a held message must not be redelivered while it
    waits), and jittered between half and all of the step so that workers do not return in
    lockstep; the half that is certain is what must add up to the covered time."""
    cap = min(30.0, settings.visibility_timeout / 3)
    covered = sum(min(cap, 2.0 ** min(i, 32)) / 2 for i in range(retries))
    if covered >= settings.transient_retry_seconds and not endless:
        return None
    step = min(cap, 2.0 ** min(retries, 32))
    return random.uniform(step / 2, step)


def failure_backoff(failures: int) -> float:
    """Seconds before another attempt at a step that raised."""
    return float(min(60, 2**failures))


#: A step of a request: what one message asks for.
StepKey = tuple[str, Step]
#: A stage's batched work: the outcome of each step it was given.
Work = Callable[[list[StepKey]], Mapping[StepKey, stages.Outcome]]


def _step_of(task: Task, delivery: Delivery, pool: Pool) -> StepKey | None:
    """The (request id, step) a message asks for, or None for a malformed one (dropped: no
    redelivery can make it well-formed)."""
    args = delivery.args
    try:
        request_id = str(uuid.UUID(str(args[0])))
    except (ValueError, TypeError, AttributeError, IndexError):
        log.error("%s: dropping message with malformed arguments %r", task.name, args)
        return None
    if task.name == TASK_ROUTE:
        return (request_id, flow.ROUTE) if len(args) == 1 else None
    tier = args[1] if len(args) == 2 else None
    if not isinstance(tier, str) or tier not in pool:
        log.error("%s: dropping message for unknown tier %r", task.name, tier)
        return None
    return (request_id, flow.generate(tier) if task.name == TASK_GENERATE else flow.score(tier))


def run_steps(task: Task, deliveries: Sequence[Delivery], work: Work, settings: Settings) -> None:
    """Run a batch of deliveries of one task: mark each delivered step running, give up the
    steps that workers died holding too often, and run the rest through ``work`` together."""
    pending: dict[StepKey, Delivery] = {}
    for delivery in deliveries:
        key = _step_of(task, delivery, settings.pool)
        if key is not None and key not in pending:
            pending[key] = delivery
    if not pending:
        return
    try:
        with session_scope(settings.database_url) as session:
            started = _start(session, pending)
            sends: list[flow.Send] = []
            for (request_id, step), start in list(started.items()):
                if start.failures >= settings.max_attempts:
                    reason = f"{step.key}: a worker died holding it {start.failures} times"
                    sends += flow.sends_for(
                        request_id, _give_up(session, request_id, step, reason, settings)
                    )
                    telemetry.record_give_up(step, "worker_died")
                    del started[(request_id, step)]
        flow.send(task.app, sends)
    except TRANSIENT_ERRORS as exc:
        _retry(task, list(pending.values()), exc, settings)
        return
    for request_id, step in pending.keys() - started.keys():
        log.info("%s of %s: already done or given up; duplicate ignored", step.key, request_id)
    todo = [key for key in pending if key in started]
    if todo:
        _work(task, todo, pending, work, settings)


def _start(session: Session, pending: Mapping[StepKey, Delivery]) -> dict[StepKey, StepStart]:
    """Mark each delivered step running, one statement per step kind: the steps not open are
    left out (their deliveries are duplicates)."""
    by_step: dict[Step, list[str]] = {}
    for request_id, step in pending:
        by_step.setdefault(step, []).append(request_id)
    started: dict[StepKey, StepStart] = {}
    for step, ids in by_step.items():
        again = [rid for rid in ids if pending[(rid, step)].redelivered]
        for rid, start in queries.start_steps(session, ids, step.key, redelivered=again).items():
            started[(rid, step)] = start
    return started


def _work(
    task: Task,
    todo: list[StepKey],
    pending: Mapping[StepKey, Delivery],
    work: Work,
    settings: Settings,
) -> None:
    try:
        outcomes = work(todo)
    except TRANSIENT_ERRORS as exc:
        _retry(task, [pending[key] for key in todo], exc, settings)
        return
    except Exception as exc:
        if len(todo) > 1:
            # One request broke the batch: each alone, so that it fails only itself.
            log.warning(
                "%s: a batch of %d raised (%s); running each alone", task.name, len(todo), exc
            )
            for key in todo:
                _work(task, [key], pending, work, settings)
            return
        _failed_attempt(task, pending[todo[0]], todo[0], exc, settings)
        return
    sends: list[flow.Send] = []
    gone: list[StepKey] = []
    for (request_id, step), outcome in outcomes.items():
        if isinstance(outcome, stages.RequestGone):
            log.info("%s: nothing to do for %s (%s)", step.key, request_id, outcome)
            gone.append((request_id, step))
        else:
            sends += flow.sends_for(request_id, outcome)
    if gone:
        with session_scope(settings.database_url) as session:
            for request_id, step in gone:
                queries.finish_step(session, request_id, step.key)
    flow.send(task.app, sends)


def _resend(task: Task, delivery: Delivery, countdown: float) -> None:
    """The message again after ``countdown`` seconds, under its own id (what ``Task.retry``
    sends); a broker that refuses leaves the open step to the sweeper."""
    flow.send_task(
        task.app,
        task.name,
        delivery.args,
        task_id=delivery.task_id,
        countdown=countdown,
        retries=delivery.retries + 1,
    )


def _retry(
    task: Task, deliveries: Sequence[Delivery], exc: BaseException, settings: Settings
) -> None:
    """An outage (database, Redis, broker, image store): each delivery again later, with
    backoff, until ``transient_retry_seconds`` are covered; after that the steps stay open and
    the sweeper re-sends them once the services are back."""
    log.warning("%s: %s; retrying %d deliveries", task.name, exc, len(deliveries))
    for delivery in deliveries:
        telemetry.record_retry(_step_of(task, delivery, settings.pool), exc)
        # A store outage leaves the database up, where the sweeper would count each re-send
        # of a step left to it as a lost message and fail the request after max_resends: it
        # is retried at the cap for as long as it lasts, its message never out of the broker.
        endless = isinstance(exc, StoreUnavailable)
        delay = transient_backoff(delivery.retries, settings, endless=endless)
        if delay is None:
            log.error("%s: left to the sweeper after retries: %s", delivery.task_id, exc)
        else:
            _resend(task, delivery, delay)


def _give_up(
    session: Session, request_id: str, step: Step, reason: str, settings: Settings
) -> list[Step]:
    log.error("%s of %s gave up: %s", step.key, request_id, reason)
    return stages.give_up(session, request_id, step, reason, budget_keeper(settings), settings.pool)


def _failed_attempt(
    task: Task, delivery: Delivery, key: StepKey, exc: Exception, settings: Settings
) -> None:
    request_id, step = key
    error = f"{step.key}: {type(exc).__name__}: {exc}"
    log.error("%s of %s failed", step.key, request_id, exc_info=exc)
    telemetry.record_failure(step, exc)
    try:
        with session_scope(settings.database_url) as session:
            failures = queries.fail_attempt(session, request_id, step.key, error)
            if step.kind == "generate" and step.tier is not None:
                opened = queries.record_tier_failure(
                    session,
                    step.tier,
                    error,
                    threshold=settings.tier_failure_threshold,
                    cooldown_seconds=settings.tier_cooldown_seconds,
                )
                if opened:
                    log.error(
                        "tier %s out of service for %.0fs after %d failures in a row: %s",
                        step.tier,
                        settings.tier_cooldown_seconds,
                        settings.tier_failure_threshold,
                        error,
                    )
            if failures is None:
                return
            if failures >= settings.max_attempts:
                reason = f"{error} (gave up after {failures} failed attempts)"
                sends = flow.sends_for(
                    request_id, _give_up(session, request_id, step, reason, settings)
                )
                telemetry.record_give_up(step, "failed_attempts")
            else:
                sends = []
    except TRANSIENT_ERRORS as outage:
        _retry(task, [delivery], outage, settings)
        return
    if failures < settings.max_attempts:
        _resend(task, delivery, failure_backoff(failures))
    flow.send(task.app, sends)
