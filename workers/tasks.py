"""Celery tasks: thin shells that parse, call a stage function, commit, and hand on.

Every task carries only the request id (prompts stay in Postgres, out of the broker and
Flower's event stream). A task that fails for good leaves its request ``failed`` with the
reason; a transient error (database or Redis connection) is retried with backoff."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import redis.exceptions
import sqlalchemy.exc
from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.orm import Session

from db import queries
from db.models import GenerationRequest, Tier
from db.session import session_scope
from workers import stages
from workers.budget import BudgetKeeper, budget_keeper_from_settings
from workers.celery_app import (
    TASK_GENERATE_CLOUD,
    TASK_GENERATE_EDGE,
    TASK_RETRAIN,
    TASK_ROUTE,
    TASK_SCORE,
    TASK_SWEEP,
    app,
)
from workers.images import ImageStore
from workers.models import generate
from workers.runtime import RouterService, model_for, pipeline_for, quality_scorer
from workers.settings import get_settings

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
    ConnectionError,
)


@lru_cache(maxsize=1)
def router_service() -> RouterService:
    return RouterService(get_settings())


@lru_cache(maxsize=1)
def budget_keeper() -> BudgetKeeper:
    return budget_keeper_from_settings(get_settings())


@lru_cache(maxsize=1)
def image_store() -> ImageStore:
    return ImageStore(get_settings().image_store)


def _mark_failed(request_id: str, reason: str) -> None:
    try:
        with session_scope(get_settings().database_url) as session:
            queries.fail(session, request_id, reason)
    except TRANSIENT_ERRORS:
        # The database is gone too: the request stays in its state and the sweeper
        # finds it once the database is back.
        log.exception("could not mark request %s failed", request_id)


def run_stage(task: Task, request_id: str, stage: str, work: Callable[[Session], T]) -> T | None:
    """Count the attempt, run the stage in one transaction, and settle failures."""
    settings = get_settings()
    try:
        uuid.UUID(request_id)
    except (ValueError, TypeError, AttributeError):
        log.error("%s: dropping message with malformed request id %r", stage, request_id)
        return None
    try:
        with session_scope(settings.database_url) as session:
            stages.live_request(session, request_id)
            attempts = queries.count_attempt(session, request_id)
        if attempts > settings.max_attempts:
            _mark_failed(
                request_id,
                f"{stage}: gave up after {attempts - 1} attempts without progress",
            )
            return None
        with session_scope(settings.database_url) as session:
            return work(session)
    except stages.RequestGone as gone:
        log.info("%s: nothing to do for %s (%s)", stage, request_id, gone)
        return None
    except TRANSIENT_ERRORS as exc:
        if task.request.retries < settings.max_attempts:
            raise task.retry(exc=exc, countdown=min(2**task.request.retries, 60)) from exc
        _mark_failed(request_id, f"{stage}: {type(exc).__name__}: {exc}")
        raise
    except Exception as exc:
        _mark_failed(request_id, f"{stage}: {type(exc).__name__}: {exc}")
        raise


@app.task(bind=True, name=TASK_ROUTE)
def route(self: Task, request_id: str) -> None:
    routed = run_stage(
        self,
        request_id,
        "route",
        lambda s: stages.route_request(s, request_id, router_service(), budget_keeper()),
    )
    if routed is not None:
        for tier in routed.tiers:
            GENERATE[tier].delay(request_id)


def _generate(task: Task, request_id: str, tier: Tier) -> None:
    settings = get_settings()

    def render(request: GenerationRequest) -> Any:
        return generate(
            pipeline_for(tier, settings),
            request.prompt,
            width=request.width,
            height=request.height,
            steps=request.steps,
            seed=request.seed,
            guidance_scale=request.guidance_scale,
        )

    model_name = model_for(tier, settings)
    generation = run_stage(
        task,
        request_id,
        f"generate {tier.value}",
        lambda s: stages.generate_image(
            s,
            request_id,
            tier,
            model_name=model_name,
            render=render,
            store=image_store(),
            worker=task.request.hostname or socket.gethostname(),
        ),
    )
    if generation is not None:
        score.delay(request_id, tier.value)


@app.task(bind=True, name=TASK_GENERATE_EDGE)
def generate_edge(self: Task, request_id: str) -> None:
    _generate(self, request_id, Tier.EDGE)


@app.task(bind=True, name=TASK_GENERATE_CLOUD)
def generate_cloud(self: Task, request_id: str) -> None:
    _generate(self, request_id, Tier.CLOUD)


GENERATE: dict[Tier, Task] = {Tier.EDGE: generate_edge, Tier.CLOUD: generate_cloud}


@app.task(bind=True, name=TASK_SCORE)
def score(self: Task, request_id: str, tier: str) -> None:
    try:
        parsed = Tier(tier)
    except ValueError:
        log.error("score: dropping message with unknown tier %r", tier)
        return
    run_stage(
        self,
        request_id,
        f"score {tier}",
        lambda s: stages.score_image(
            s, request_id, parsed, scorer=quality_scorer(get_settings()), store=image_store()
        ),
    )


@app.task(name=TASK_SWEEP)
def sweep() -> int:
    from workers.sweeper import sweep_stuck

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        resends = sweep_stuck(session, settings)
    for resend in resends:
        app.send_task(resend.task, args=list(resend.args))
    return len(resends)


@app.task(name=TASK_RETRAIN)
def retrain() -> dict[str, Any]:
    from workers.retrain import retrain_router

    return retrain_router(get_settings()).as_dict()
