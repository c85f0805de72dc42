"""Celery tasks: thin shells that parse, call a stage function, commit, and hand on.

Every task carries only the request id (prompts stay in Postgres, out of the broker and
Flower's event stream). A task that fails for good leaves its request ``failed`` with the
reason; an outage (a database or Redis connection, an image store that cannot take a file)
is retried with backoff, never counted as an attempt."""

from __future__ import annotations

import logging
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import redis.exceptions
import sqlalchemy.exc
from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.orm import Session

from db import queries
from db.models import GenerationRequest
from db.queries import StepStart
from db.session import session_scope
from workers import stages
from workers.app import flow
from workers.app.celery_app import (
    TASK_CALLBACK,
    TASK_GENERATE,
    TASK_RETRAIN,
    TASK_ROUTE,
    TASK_SCORE,
    TASK_SWEEP,
    app,
)
from workers.app.flow import Step
from workers.engine.batching import BatchTask, Delivery
from workers.pool import Pool
from workers.services import telemetry
from workers.services.images import StoreUnavailable
from workers.services.pipelines import generate_many
from workers.services.runtime import (
    budget_keeper,
    image_store,
    model_for,
    pipeline_for,
    quality_scorer,
    router_service,
)
from workers.settings import Settings, get_settings
from workers.stages import callbacks

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


def _send(steps: list[flow.Send]) -> None:
    flow.send(app, steps)


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


def run_steps(task: Task, deliveries: Sequence[Delivery], work: Work) -> None:
    """Run a batch of deliveries of one task. A delivery whose step is closed is a duplicate
    and does nothing; only a failure (the stage raised, or a worker died holding the
    message) counts as an attempt, and after ``max_attempts`` the step gives up
    (``stages.give_up``). The steps that start run through ``work`` together."""
    settings = get_settings()
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
                    sends += flow.sends_for(request_id, _give_up(session, request_id, step, reason))
                    telemetry.record_give_up(step, "worker_died")
                    del started[(request_id, step)]
        _send(sends)
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
    _send(sends)


def _resend(task: Task, delivery: Delivery, countdown: float) -> None:
    """The message again after ``countdown`` seconds, under its own id (what
    ``Task.retry`` sends); a broker that refuses leaves the open step to the sweeper."""
    try:
        task.app.send_task(
            task.name,
            args=list(delivery.args),
            task_id=delivery.task_id,
            countdown=countdown,
            retries=delivery.retries + 1,
        )
    except Exception:
        log.warning("broker unavailable; %s left to the sweeper", delivery.task_id, exc_info=True)


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


def _give_up(session: Session, request_id: str, step: Step, reason: str) -> list[Step]:
    log.error("%s of %s gave up: %s", step.key, request_id, reason)
    return stages.give_up(session, request_id, step, reason, budget_keeper(), get_settings().pool)


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
                sends = flow.sends_for(request_id, _give_up(session, request_id, step, reason))
                telemetry.record_give_up(step, "failed_attempts")
            else:
                sends = []
    except TRANSIENT_ERRORS as outage:
        _retry(task, [delivery], outage, settings)
        return
    if failures < settings.max_attempts:
        _resend(task, delivery, failure_backoff(failures))
    _send(sends)


def escalation() -> stages.Escalation | None:
    settings = get_settings()
    if settings.escalation_threshold is None or settings.max_escalations == 0:
        return None
    return stages.Escalation(
        settings.escalation_threshold, settings.max_escalations, budget_keeper(), settings.pool
    )


def _route(keys: list[StepKey]) -> dict[StepKey, stages.Outcome]:
    settings = get_settings()
    with telemetry.decision_timer(len(keys)), session_scope(settings.database_url) as session:
        outcomes = stages.route_requests(
            session, [rid for rid, _ in keys], router_service(), budget_keeper(), settings.pool
        )
    return {(rid, flow.ROUTE): outcomes[rid] for rid, _ in keys}


def _tier_key(key: StepKey) -> stages.Key:
    request_id, step = key
    assert step.tier is not None
    return request_id, step.tier


def _generate(keys: list[StepKey], worker: str) -> dict[StepKey, stages.Outcome]:
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        jobs = stages.generation_jobs(session, [_tier_key(key) for key in keys])
    outcomes: dict[StepKey, stages.Outcome] = {}
    renders: dict[stages.Key, GenerationRequest] = {}
    for key in keys:
        job = jobs[_tier_key(key)]
        if isinstance(job, stages.RequestGone):
            outcomes[key] = job
        elif job is not None:
            renders[_tier_key(key)] = job
    # Rendered outside any transaction: a GPU call holds no database connection.
    images = render(renders, settings, worker)
    made = {_tier_key(key): images.get(_tier_key(key)) for key in keys if key not in outcomes}
    if made:
        with session_scope(settings.database_url) as session:
            handed = stages.complete_generations(session, made)
        outcomes.update(
            {(rid, flow.generate(tier)): steps for (rid, tier), steps in handed.items()}
        )
    return outcomes


def render(
    jobs: Mapping[stages.Key, GenerationRequest], settings: Settings, worker: str
) -> dict[stages.Key, stages.NewImage]:
    """Each job's image, in one diffusers call per tier and set of generation parameters
    (size, steps, guidance), at most the tier's ``max_batch`` prompts a call. When the image
    store gives out, the images written before have no rows: they are removed, and made again
    with the rest when the outage is retried."""
    groups: dict[tuple[str, int, int, int, float | None], list[stages.Key]] = {}
    for (request_id, tier), job in jobs.items():
        spec = settings.pool[tier]
        guidance = job.guidance_scale if job.guidance_scale is not None else spec.guidance_scale
        steps = job.steps or spec.steps or settings.default_steps
        groups.setdefault((tier, job.width, job.height, steps, guidance), []).append(
            (request_id, tier)
        )
    images: dict[stages.Key, stages.NewImage] = {}
    try:
        for (tier, width, height, steps, guidance), keys in groups.items():
            size = settings.pool[tier].max_batch or settings.generate_batch_size
            for chunk in (keys[i : i + size] for i in range(0, len(keys), size)):
                started = time.perf_counter()
                pictures = generate_many(
                    pipeline_for(tier, settings),
                    [jobs[key].prompt for key in chunk],
                    [jobs[key].seed for key in chunk],
                    width=width,
                    height=height,
                    steps=steps,
                    guidance_scale=guidance,
                )
                # What each request waited for: the whole call.
                latency_ms = (time.perf_counter() - started) * 1000.0
                for (request_id, _), picture in zip(chunk, pictures, strict=True):
                    images[(request_id, tier)] = stages.NewImage(
                        model=model_for(tier, settings),
                        image_path=image_store().save(request_id, tier, picture),
                        latency_ms=latency_ms,
                        worker=worker,
                    )
    except StoreUnavailable as exc:
        telemetry.record_store_outage(exc)
        for image in images.values():
            image_store().remove(image.image_path)
        raise
    return images


def _score(keys: list[StepKey]) -> dict[StepKey, stages.Outcome]:
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        outcomes = stages.score_images(
            session,
            [_tier_key(key) for key in keys],
            scorer=quality_scorer(settings),
            store=image_store(),
            escalation=escalation(),
        )
    return {(rid, flow.score(tier)): outcome for (rid, tier), outcome in outcomes.items()}


def _batched(name: str, stage: Literal["route", "quality", "generate"]) -> dict[str, Any]:
    """The task options of a batched stage: its name and its batch from the settings."""
    size, wait = get_settings().batching(stage)
    return {
        "bind": True,
        "base": BatchTask,
        "name": name,
        "batch_size": size,
        "batch_wait_seconds": wait,
    }


@app.task(**_batched(TASK_ROUTE, "route"))
def route(self: Task, deliveries: list[Delivery]) -> None:
    """Route a batch of requests (one router forward pass)."""
    run_steps(self, deliveries, _route)


@app.task(**_batched(TASK_GENERATE, "generate"))
def generate_image(self: Task, deliveries: list[Delivery]) -> None:
    """Render a batch of requests' images on the tiers they name (each message routed to
    its tier's queue)."""
    worker = next((d.hostname for d in deliveries if d.hostname), None) or socket.gethostname()
    run_steps(self, deliveries, lambda keys: _generate(keys, worker))


@app.task(**_batched(TASK_SCORE, "quality"))
def score(self: Task, deliveries: list[Delivery]) -> None:
    """Score a batch of images (one CLIP call)."""
    run_steps(self, deliveries, _score)


@app.task(name=TASK_SWEEP)
def sweep() -> int:
    """Re-send the steps whose messages are lost, and the overdue callbacks; returns how many
    steps were sent."""
    from workers.engine.sweeper import read_broker
    from workers.engine.sweeper import sweep as sweep_lost

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        resends, gave_up = sweep_lost(
            session,
            settings,
            lambda: read_broker(app, settings.queues.values()),
            budget_keeper(),
            settings.pool,
        )
    _send(resends)
    telemetry.record_sweep(resends, gave_up)
    callbacks.resend_overdue(settings)
    return len(resends)


@app.task(
    name=TASK_CALLBACK,
    bind=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def callback(self: Task, request_id: str, refusals: int = 0) -> str | None:
    """Make the next attempt of a request's callback; its delivery's state after it."""
    state = callbacks.deliver(
        request_id, get_settings(), worker=self.request.hostname, refusals=refusals
    )
    return None if state is None else state.value


@app.task(
    name=TASK_RETRAIN,
    time_limit=get_settings().retrain_time_limit,
    soft_time_limit=get_settings().retrain_time_limit - 30,
)
def retrain() -> dict[str, Any]:
    """Train, gate and maybe promote a router; one run at a time across all workers (two
    beat ticks, or a tick and ``t2iroute retrain``, never train twice at once)."""
    from workers.services.retraining import retrain_lock, retrain_router

    settings = get_settings()
    with retrain_lock(settings) as held:
        if not held:
            log.info("retraining skipped: another run holds the lock")
            return {"status": "skipped", "reason": "another retraining run holds the lock"}
        return retrain_router(settings).as_dict()
