"""The Celery tasks: shells that read the settings, call the runner or a stage, and hand
on. Every task carries only the request id (prompts stay in Postgres, out of the broker and
Flower's event stream)."""

from __future__ import annotations

import logging
import socket
from typing import Any, Literal

from celery import Task
from celery.signals import worker_process_shutdown

from db.session import session_scope
from workers.app import flow
from workers.app.celery_app import app
from workers.app.names import (
    TASK_CALLBACK,
    TASK_GENERATE,
    TASK_RETRAIN,
    TASK_ROUTE,
    TASK_SCORE,
    TASK_SWEEP,
)
from workers.engine import work
from workers.engine.batching import BatchTask, Delivery
from workers.engine.runner import TRANSIENT_ERRORS, run_steps
from workers.services import telemetry
from workers.services.runtime import budget_keeper
from workers.settings import get_settings
from workers.stages import callbacks

log = logging.getLogger(__name__)

#: The settings the tasks are defined with (batch sizes, time limits); each task reads them
#: again when it runs.
_DEFINED_WITH = get_settings()


def _batched(name: str, stage: Literal["route", "quality", "generate"]) -> dict[str, Any]:
    """The task options of a batched stage: its name and its batch from the settings."""
    size, wait = _DEFINED_WITH.batching(stage)
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
    settings = get_settings()
    run_steps(self, deliveries, lambda keys: work.route(keys, settings), settings)


@app.task(**_batched(TASK_GENERATE, "generate"))
def generate_image(self: Task, deliveries: list[Delivery]) -> None:
    """Render a batch of images on the tiers they name (each tier has its own queue)."""
    settings = get_settings()
    worker = next((d.hostname for d in deliveries if d.hostname), None) or socket.gethostname()
    run_steps(self, deliveries, lambda keys: work.generate(keys, settings, worker), settings)


@app.task(**_batched(TASK_SCORE, "quality"))
def score(self: Task, deliveries: list[Delivery]) -> None:
    """Score a batch of images (one CLIP call)."""
    settings = get_settings()
    run_steps(self, deliveries, lambda keys: work.score(keys, settings), settings)


@app.task(name=TASK_SWEEP)
def sweep() -> int:
    """Re-send the lost steps and the overdue callbacks; how many steps were sent."""
    from workers.engine.sweeper import read_broker
    from workers.engine.sweeper import sweep as sweep_lost

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        resends, gave_up = sweep_lost(
            session,
            settings,
            lambda: read_broker(app, settings.queues.values()),
            budget_keeper(settings),
            settings.pool,
        )
    flow.send(app, resends)
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
    time_limit=_DEFINED_WITH.retrain_time_limit,
    soft_time_limit=_DEFINED_WITH.retrain_time_limit - 30,
)
def retrain() -> dict[str, Any]:
    """Train, gate and maybe promote a router, one run at a time across all workers."""
    from workers.services.retraining import retrain_lock, retrain_router

    settings = get_settings()
    with retrain_lock(settings) as held:
        if not held:
            log.info("retraining skipped: another run holds the lock")
            return {"status": "skipped", "reason": "another retraining run holds the lock"}
        return retrain_router(settings).as_dict()


@worker_process_shutdown.connect
def _forget_exited_child(pid: int, **_: Any) -> None:
    # Connected here, with the tasks every worker loads, rather than with the app that
    # producers import too: the app stays below the services it would call.
    telemetry.process_exited(pid)
