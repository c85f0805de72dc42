"""Micro-batching of Celery messages, with each message still a Celery request of its own.

A worker that consumes a batched task keeps its messages in a buffer in the consumer, and
hands the pool one call for up to ``batch_size`` of them, or for what arrived within
``batch_wait_seconds`` of the first (a lone message waits no longer than that). The task
runs ``run(deliveries)`` once for the batch: one router forward pass, one CLIP call, one
diffusers call per shared set of generation parameters.

What a message is to Celery does not change. Each one is a worker request
(``celery.worker.request.Request``) with its own bookkeeping. The batch's pool callbacks
hand each request its own outcome through Celery's handlers:

* ``on_accepted``: task-started events, and ``inspect active``.
* ``on_success``: acknowledged after the batch returns (acks late) and task-succeeded.
* ``on_failure``: a worker lost mid-batch rejects every message of it back to the queue,
  as ``task_reject_on_worker_lost`` does for one task.
* ``on_timeout``: a batch past the hard time limit is acknowledged, like a task.

Everything is recorded per message, so Flower, the sweeper and the fault suite see the
messages they saw before. A failure of one request is the task's to handle within the
batch (workers/engine/runner.py): it never fails the others.

celery-batches does the same buffering, but it acknowledges a batch whose worker died and
requires celery < 5.7; this is the part of it that t2iroute needs, on Celery's own request
handlers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task, current_app, signals
from celery.utils.imports import symbol_by_name
from celery.utils.time import timezone
from celery.worker.request import create_request_cls
from celery.worker.state import task_reserved
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.asynchronous.timer import to_timestamp

from workers.app.liveness import mark_busy, mark_idle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One message of a batch, as the task sees it: plain data, so that it crosses to a
    prefork child."""

    task_id: str
    args: tuple[Any, ...]
    #: The broker delivered this message before, to a worker that did not acknowledge it.
    redelivered: bool = False
    #: Retries already made of this message (``countdown`` re-sends by the task).
    retries: int = 0
    hostname: str | None = None

    @classmethod
    def of(cls, request: Any) -> Delivery:
        return cls(
            task_id=request.id,
            args=tuple(request.args),
            redelivered=bool((request.delivery_info or {}).get("redelivered")),
            retries=int(request.request_dict.get("retries") or 0),
            hostname=request.hostname,
        )


class BatchTask(Task):
    """A task whose ``run`` takes a list of ``Delivery``: the worker calls it with a batch of
    messages (``batch_strategy``). Set ``batch_size`` and ``batch_wait_seconds`` on the task.
    """

    Strategy = "workers.engine.batching:batch_strategy"
    typing = False
    batch_size = 1
    batch_wait_seconds = 0.05

    def run_now(self, *args: Any) -> None:
        """Run one message's work in this process (tests and tools), as a batch of one."""
        self.run([Delivery(task_id=f"local/{time.monotonic_ns()}", args=args)])


def execute_batch(task_name: str, deliveries: Sequence[Delivery]) -> None:
    """The pool's side of a batch (in a prefork child, or inline for solo). It never raises
    for the batch's work: a failure is the task's to record per request, and a bug is
    logged and the messages acknowledged (the steps stay open, for the sweeper)."""
    hostname = next((d.hostname for d in deliveries if d.hostname), None)
    if hostname:
        mark_busy(hostname)
    try:
        current_app.tasks[task_name].run(list(deliveries))
    except Exception:
        log.exception(
            "%s: a batch of %d raised; its steps are left open", task_name, len(deliveries)
        )
    finally:
        if hostname:
            mark_idle(hostname)


class Batcher:
    """The consumer's buffer of one task's requests, flushed at ``size`` or ``wait`` after
    the first. The event loop and (without one) the timer thread both reach it: a lock."""

    def __init__(self, task: BatchTask, consumer: Any) -> None:
        self.task = task
        self.consumer = consumer
        self.size = max(1, int(task.batch_size))
        self.wait = float(task.batch_wait_seconds)
        self._lock = threading.Lock()
        self._buffer: list[Any] = []
        self._timer: Any = None

    def add(self, request: Any) -> None:
        with self._lock:
            self._buffer.append(request)
            if len(self._buffer) >= self.size:
                batch = self._take()
            else:
                if self._timer is None:
                    self._timer = self.consumer.timer.call_after(self.wait, self._flush_due)
                batch = []
        if batch:
            self._execute(batch)

    def _flush_due(self) -> None:
        with self._lock:
            self._timer = None
            batch = self._take()
        if batch:
            self._execute(batch)

    def _take(self) -> list[Any]:
        batch, self._buffer = self._buffer, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return batch

    def _execute(self, requests: list[Any]) -> None:
        task = self.task
        conf = task.app.conf

        def accepted(pid: int, time_accepted: float) -> None:
            for request in requests:
                request.on_accepted(pid, time_accepted)

        started = time.monotonic()

        def returned(_: object) -> None:
            runtime = time.monotonic() - started
            for request in requests:
                request.on_success((False, None, runtime))

        def failed(exc_info: Any) -> None:
            for request in requests:
                request.on_failure(exc_info)

        def timed_out(soft: bool, timeout: float) -> None:
            for request in requests:
                request.on_timeout(soft, timeout)

        self.consumer.pool.apply_async(
            execute_batch,
            args=(task.name, [Delivery.of(r) for r in requests]),
            accept_callback=accepted,
            callback=returned,
            error_callback=failed,
            timeout_callback=timed_out,
            soft_timeout=task.soft_time_limit or conf.task_soft_time_limit,
            timeout=task.time_limit or conf.task_time_limit,
            correlation_id=requests[0].id,
        )


def batch_strategy(task: BatchTask, app: Celery, consumer: Any, **_: Any) -> Callable[..., None]:
    """Celery's task strategy for a ``BatchTask``: what ``celery.worker.strategy.default``
    does with a message (a request, received signal and event, revocation, ETA), except
    that a due request goes to the batcher instead of straight to the pool."""
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    sends_events = bool(eventer and eventer.enabled and task.send_events)
    Request = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, hostname, eventer, app=app
    )
    revoked = consumer.controller.state.revoked
    batcher = Batcher(task, consumer)

    def due(request: Any) -> None:
        task_reserved(request)
        batcher.add(request)

    def after_eta(request: Any) -> None:
        due(request)
        consumer.qos.decrement_eventually()

    def handle(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **__: Any) -> None:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = (
                message.body,
                message.headers,
                False,
                app.uses_utc_timezone(),
            )
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        request = Request(
            message,
            on_ack=ack,
            on_reject=reject,
            app=app,
            hostname=hostname,
            eventer=eventer,
            task=task,
            connection_errors=consumer.connection_errors,
            body=body,
            headers=headers,
            decoded=decoded,
            utc=utc,
        )
        if (request.expires or request.id in revoked) and request.revoked():
            return
        signals.task_received.send(sender=consumer, request=request)
        if sends_events:
            eventer.send(
                "task-received",
                uuid=request.id,
                name=request.name,
                args=request.argsrepr,
                kwargs=request.kwargsrepr,
                root_id=request.root_id,
                parent_id=request.parent_id,
                retries=request.request_dict.get("retries", 0),
                eta=request.eta and request.eta.isoformat(),
                expires=request.expires and request.expires.isoformat(),
            )
        if request.eta:
            # A retry with a countdown: held (unacknowledged) until due, as Celery does.
            eta = (
                to_timestamp(timezone.to_system(request.eta))
                if request.utc
                else to_timestamp(request.eta, app.timezone)
            )
            consumer.qos.increment_eventually()
            consumer.timer.call_at(eta, after_eta, (request,), priority=6)
            return
        due(request)

    return handle
