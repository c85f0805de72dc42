"""The one Celery app. Routing of tasks to queues and every reliability setting is
configuration here, following DESIGN.md's reliability rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
)

from db.session import dispose_engines, skip_pre_ping
from workers.app.broker import transport_for
from workers.app.liveness import mark_busy, mark_idle
from workers.app.names import (
    TASK_CALLBACK,
    TASK_GENERATE,
    TASK_RETRAIN,
    TASK_ROUTE,
    TASK_SCORE,
    TASK_SWEEP,
)
from workers.app.threads import apply_threads
from workers.pool import Pool
from workers.settings import Settings, get_settings


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith("filesystem"):
        if settings.broker_folder is None:
            raise ValueError("a filesystem:// broker needs T2IROUTE_BROKER_FOLDER")
        folder = str(settings.broker_folder)
        return {
            "data_folder_in": folder,
            "data_folder_out": folder,
            # Exchange bindings; kombu's default is a "control" folder in the working directory.
            "control_folder": str(settings.broker_folder / "control"),
            "store_processed": False,
        }
    # Redis redelivers an unacknowledged message only after the visibility timeout, so it
    # must outlast the longest task or a slow task runs twice.
    return {"visibility_timeout": settings.visibility_timeout}


class GenerationRoute:
    """Celery router: a generation goes to the queue of the tier it names (its second
    argument), so every tier of the pool has its own workers."""

    def __init__(self, pool: Pool) -> None:
        self.queues = {tier.name: tier.queue_name for tier in pool}

    def __call__(
        self, name: str, args: Sequence[Any], kwargs: Any, options: Any, **_: Any
    ) -> dict[str, str] | None:
        if name != TASK_GENERATE or len(args) < 2 or args[1] not in self.queues:
            return None
        return {"queue": self.queues[args[1]]}


def batch_size_of(settings: Settings, queue: str) -> int:
    """The batch size of the stage a queue feeds."""
    if queue == settings.queue_route:
        return settings.batching("route")[0]
    if queue == settings.queue_quality:
        return settings.batching("quality")[0]
    for tier in settings.pool:
        if queue == tier.queue_name:
            return max(settings.batching("generate")[0], tier.max_batch or 1)
    return 1


def prefetch_multiplier(settings: Settings, queues: Sequence[str] | None = None) -> int:
    """Messages a worker's pool process may hold: two batches of the largest stage among
    ``queues`` (every queue when not given)."""
    names = list(settings.queues.values()) if queues is None else list(queues)
    return 2 * max([batch_size_of(settings, q) for q in names] or [1])


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options = _transport_options(settings)
    return {
        "broker_url": settings.broker_url,
        # kombu's Redis transport with a guard for its reconnect crash (workers/app/broker.py).
        "broker_transport": transport_for(settings.broker_url),
        "result_backend": settings.result_backend,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickle left in accept_content is a remote-code path.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # The state lives in the database; results would only fill the backend.
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A batching worker must hold a batch's messages to fill it, and the next batch's
        # while one runs: twice the largest batch per pool process (``t2iroute worker`` sets
        # it from the worker's own queues). Unacknowledged until done all the same.
        "worker_prefetch_multiplier": prefetch_multiplier(settings),
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_max_memory_per_child": settings.worker_max_memory_per_child_kb,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_default_queue": settings.queue_route,
        "task_routes": (
            {
                TASK_ROUTE: {"queue": settings.queue_route},
                TASK_SCORE: {"queue": settings.queue_quality},
                TASK_SWEEP: {"queue": settings.queue_maintenance},
                TASK_RETRAIN: {"queue": settings.queue_maintenance},
                TASK_CALLBACK: {"queue": settings.queue_callbacks},
            },
            GenerationRoute(settings.pool),
        ),
        # A filesystem broker has no fanout exchange for remote control (pidbox).
        "worker_enable_remote_control": not settings.broker_url.startswith("filesystem"),
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "beat_schedule": {
            "sweep": {"task": TASK_SWEEP, "schedule": settings.sweep_interval_seconds},
            "retrain": {"task": TASK_RETRAIN, "schedule": settings.retrain_interval_seconds},
        },
        "timezone": "UTC",
    }


def create_app(settings: Settings | None = None) -> Celery:
    app = Celery("t2iroute", include=["workers.engine.tasks"])
    app.conf.update(celery_config(settings or get_settings()))
    return app


app = create_app()


# Processes of this worker's pool that run tasks at once (1 for solo), set at worker_init
# in the parent and inherited by the pool's children.
_pool_processes = 1


@worker_init.connect
def _size_threads(sender: Any, **_: Any) -> None:
    global _pool_processes
    solo = "solo" in str(getattr(sender, "pool_cls", "")).lower()
    _pool_processes = 1 if solo else max(1, int(getattr(sender, "concurrency", 1) or 1))
    # Tasks retry a connection a database restart broke: no round trip per checkout.
    skip_pre_ping()
    # The threads pool and solo run tasks in this process; prefork sets it again per child.
    apply_threads(get_settings().torch_threads, _pool_processes)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Pooled database connections inherited from the parent are not fork-safe.
    dispose_engines()
    apply_threads(get_settings().torch_threads, _pool_processes)


@worker_ready.connect
def _forget_an_earlier_run(sender: Any, **_: Any) -> None:
    # A busy marker left by a worker killed mid-task must not vouch for its successor.
    mark_idle(sender.hostname)


@task_prerun.connect
def _mark_busy(task: Any, **_: Any) -> None:
    # The liveness check tells a solo worker busy with a task from a wedged one by this.
    if task.request.hostname:
        mark_busy(task.request.hostname)


@task_postrun.connect
def _mark_idle(task: Any, **_: Any) -> None:
    if task.request.hostname:
        mark_idle(task.request.hostname)
