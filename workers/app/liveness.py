"""Is the worker on this host alive? The check behind ``t2iroute worker-health``.

A worker is alive when it answers a Celery ping addressed to its node name: the reply
crosses the broker both ways and is sent by the worker's own event loop, so it fails for a
dead process, a lost broker connection that never came back, and a wedged loop alike.

A solo-pool worker (one per GPU) runs each task inside that loop and cannot answer while a
generation runs. So the worker also keeps a busy marker on this host, written when a task
starts and removed when it ends; a worker that does not answer but has been inside one task
for less than the task time limit is busy, not wedged. Past the limit it is wedged (the solo
pool does not enforce the hard time limit), and the check fails."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from celery.utils.nodenames import default_nodename, host_format
from kombu.exceptions import OperationalError

__all__ = [
    "WorkerHealth",
    "busy_marker",
    "check_worker",
    "mark_busy",
    "mark_idle",
    "node_name",
]


def node_name(hostname: str | None) -> str:
    """The node name a worker started with ``--hostname`` gets (``router@%h``, ``None``...)."""
    return host_format(default_nodename(hostname or ""))


def busy_marker(node: str) -> Path:
    """Where the worker ``node`` records the start of the task it is running."""
    return Path(tempfile.gettempdir()) / f"t2iroute-busy-{node}"


@dataclass(frozen=True)
class WorkerHealth:
    node: str
    alive: bool
    reason: str


def check_worker(app: Celery, node: str, *, timeout: float, time_limit: float) -> WorkerHealth:
    """Ping ``node``; without an answer, it is alive only while busy within ``time_limit``."""
    try:
        with app.connection_for_write() as connection:
            # One attempt: a health check must fail, not wait out the broker's retries.
            connection.ensure_connection(max_retries=1)
            replies = app.control.ping(destination=[node], timeout=timeout, connection=connection)
    except OperationalError as exc:
        # kombu's message names host and port, never the password.
        return WorkerHealth(node, False, f"broker unreachable: {exc}")
    if replies:
        return WorkerHealth(node, True, "answered a ping")
    try:
        started = float(busy_marker(node).read_text())
    except (OSError, ValueError):
        return WorkerHealth(node, False, f"no answer to a ping within {timeout:g} s")
    busy_for = time.time() - started
    if busy_for < time_limit:
        return WorkerHealth(node, True, f"busy with one task for {busy_for:.0f} s")
    return WorkerHealth(
        node, False, f"no answer, inside one task for {busy_for:.0f} s (limit {time_limit:g} s)"
    )


def mark_busy(node: str) -> None:
    busy_marker(node).write_text(f"{time.time():.3f}")


def mark_idle(node: str) -> None:
    busy_marker(node).unlink(missing_ok=True)
