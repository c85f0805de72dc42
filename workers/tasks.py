"""Celery tasks: thin shells that parse, call a stage function, commit, and hand on.

Every task carries only the request id (prompts stay in Postgres, out of the broker and
Flower's event stream). A task that fails for good leaves its request ``failed`` with the
reason; a transient error (database or Redis connection) is retried with backoff."""

from __future__ import annotations

import logging
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.exceptions
import sqlalchemy.exc
from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.orm import Session

from db import queries
from db.session import session_scope
from workers import flow, stages
from workers.celery_app import (
    TASK_GENERATE,
    TASK_RETRAIN,
    TASK_ROUTE,
    TASK_SCORE,
    TASK_SWEEP,
    app,
)
from workers.flow import Step
from workers.pipelines import generate
from workers.runtime import (
    budget_keeper,
    image_store,
    model_for,
    pipeline_for,
    quality_scorer,
    router_service,
)
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
    ConnectionError,
)


def _mark_failed(request_id: str, reason: str) -> None:
    try:
        with session_scope(get_settings().database_url) as session:
            queries.fail(session, request_id, reason)
    except TRANSIENT_ERRORS:
        # The database is gone too: the step stays open and the sweeper finds it.
        log.exception("could not mark request %s failed", request_id)


def transient_backoff(retries: int, settings: Settings) -> float | None:
    """Seconds before retry ``retries + 1`` of a database or Redis outage, or None once the
    retries have covered ``transient_retry_seconds``. Exponential, capped below the
    visibility timeout (a held message must not be redelivered while it waits), and
    jittered between half and all of the step so that workers do not return in lockstep;
    the half that is certain is what must add up to the covered time."""
    cap = min(30.0, settings.visibility_timeout / 3)
    covered = sum(min(cap, 2.0**i) / 2 for i in range(retries))
    if covered >= settings.transient_retry_seconds:
        return None
    step = min(cap, 2.0**retries)
    return random.uniform(step / 2, step)


def failure_backoff(failures: int) -> float:
    """Seconds before another attempt at a step that raised."""
    return float(min(60, 2**failures))


def _send(steps: list[flow.Send]) -> None:
    flow.send(app, steps)


def run_step(task: Task, request_id: str, step: Step, work: Callable[[], list[Step]]) -> None:
    """Run one delivery of a step. A delivery whose step is closed is a duplicate and does
    nothing; only a failure (the stage raised, or a worker died holding the message) counts
    as an attempt, and after ``max_attempts`` the step gives up (``stages.give_up``)."""
    settings = get_settings()
    try:
        uuid.UUID(request_id)
    except (ValueError, TypeError, AttributeError):
        log.error("%s: dropping message with malformed request id %r", step.key, request_id)
        return
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    try:
        with session_scope(settings.database_url) as session:
            started = queries.start_step(session, request_id, step.key, redelivered=redelivered)
            if started is not None and started.failures >= settings.max_attempts:
                reason = f"{step.key}: a worker died holding it {started.failures} times"
                _send(flow.sends_for(request_id, _give_up(session, request_id, step, reason)))
                return
        if started is None:
            log.info("%s of %s: already done or given up; duplicate ignored", step.key, request_id)
            return
        _send(flow.sends_for(request_id, work()))
    except stages.RequestGone as gone:
        log.info("%s: nothing to do for %s (%s)", step.key, request_id, gone)
        _close(request_id, step)
    except TRANSIENT_ERRORS as exc:
        delay = transient_backoff(task.request.retries, settings)
        if delay is None:
            # The step stays open: the sweeper re-sends it once the services are back.
            raise
        raise task.retry(exc=exc, countdown=delay, max_retries=None) from exc
    except Exception as exc:
        _failed_attempt(task, request_id, step, exc, settings)


def _close(request_id: str, step: Step) -> None:
    with session_scope(get_settings().database_url) as session:
        queries.finish_step(session, request_id, step.key)


def _give_up(session: Session, request_id: str, step: Step, reason: str) -> list[Step]:
    log.error("%s of %s gave up: %s", step.key, request_id, reason)
    return stages.give_up(session, request_id, step, reason, budget_keeper(), get_settings().pool)


def _failed_attempt(
    task: Task, request_id: str, step: Step, exc: Exception, settings: Settings
) -> None:
    error = f"{step.key}: {type(exc).__name__}: {exc}"
    log.error("%s of %s failed", step.key, request_id, exc_info=exc)
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
            _send(flow.sends_for(request_id, _give_up(session, request_id, step, reason)))
            return
    raise task.retry(exc=exc, countdown=failure_backoff(failures), max_retries=None)


def escalation() -> stages.Escalation | None:
    settings = get_settings()
    if settings.escalation_threshold is None or settings.max_escalations == 0:
        return None
    return stages.Escalation(
        settings.escalation_threshold, settings.max_escalations, budget_keeper(), settings.pool
    )


def _in_transaction(work: Callable[[Session], list[Step]]) -> list[Step]:
    with session_scope(get_settings().database_url) as session:
        return work(session)


@app.task(bind=True, name=TASK_ROUTE)
def route(self: Task, request_id: str) -> None:
    run_step(
        self,
        request_id,
        flow.ROUTE,
        lambda: _in_transaction(
            lambda s: stages.route_request(
                s, request_id, router_service(), budget_keeper(), get_settings().pool
            )
        ),
    )


@app.task(bind=True, name=TASK_GENERATE)
def generate_image(self: Task, request_id: str, tier: str) -> None:
    """Render a request's image on one tier of the pool (routed to that tier's queue)."""
    settings = get_settings()
    if tier not in settings.pool:
        log.error("generate: dropping message for unknown tier %r", tier)
        return
    spec = settings.pool[tier]

    def work() -> list[Step]:
        with session_scope(settings.database_url) as session:
            job = stages.generation_job(session, request_id, tier)
        image = None
        if job is not None:
            # Rendered outside any transaction: a GPU call holds no database connection.
            started = time.perf_counter()
            picture = generate(
                pipeline_for(tier, settings),
                job.prompt,
                width=job.width,
                height=job.height,
                steps=job.steps or spec.steps or settings.default_steps,
                seed=job.seed,
                guidance_scale=job.guidance_scale
                if job.guidance_scale is not None
                else spec.guidance_scale,
            )
            image = stages.NewImage(
                model=model_for(tier, settings),
                image_path=image_store().save(request_id, tier, picture),
                latency_ms=(time.perf_counter() - started) * 1000.0,
                worker=self.request.hostname or socket.gethostname(),
            )
        with session_scope(settings.database_url) as session:
            return stages.complete_generation(session, request_id, tier, image)

    run_step(self, request_id, flow.generate(tier), work)


@app.task(bind=True, name=TASK_SCORE)
def score(self: Task, request_id: str, tier: str) -> None:
    if tier not in get_settings().pool:
        log.error("score: dropping message for unknown tier %r", tier)
        return
    run_step(
        self,
        request_id,
        flow.score(tier),
        lambda: _in_transaction(
            lambda s: stages.score_image(
                s,
                request_id,
                tier,
                scorer=quality_scorer(get_settings()),
                store=image_store(),
                escalation=escalation(),
            )
        ),
    )


@app.task(name=TASK_SWEEP)
def sweep() -> int:
    """Re-send the steps whose messages are lost; returns how many were sent."""
    from workers.sweeper import read_broker
    from workers.sweeper import sweep as sweep_lost

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        resends, _ = sweep_lost(
            session,
            settings,
            lambda: read_broker(app, settings.queues.values()),
            budget_keeper(),
            settings.pool,
        )
    _send(resends)
    return len(resends)


@app.task(name=TASK_RETRAIN)
def retrain() -> dict[str, Any]:
    from workers.retrain import retrain_router

    return retrain_router(get_settings()).as_dict()
