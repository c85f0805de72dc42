"""What the Redis broker holds, per request and step.

kombu's Redis transport keeps a queue as a list named after it (and one list per priority
step, named ``queue + "\\x06\\x16" + priority``) holding JSON messages, and keeps every
delivered but unacknowledged message in the ``unacked`` hash as ``[message, exchange,
routing_key]``. A task message's Celery id is ``"{step}/{request_id}/{n}"``, n the send
number, so both can be counted per (request, step)."""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

__all__ = [
    "STEPS",
    "DispatchId",
    "TaskMessage",
    "held",
    "per_step",
    "queued",
    "snapshot",
]

STEPS = ("route", "generate:edge", "generate:cloud", "score:edge", "score:cloud")
PRIORITY_SEPARATOR = "\x06\x16"
UNACKED_KEY = "unacked"


@dataclass(frozen=True)
class DispatchId:
    step: str
    request_id: str
    send: int


def parse_task_id(task_id: str) -> DispatchId | None:
    """The (step, request, send number) a task id names; None for an id of another form."""
    parts = task_id.split("/")
    if len(parts) != 3 or parts[0] not in STEPS or not parts[2].isdigit():
        return None
    return DispatchId(step=parts[0], request_id=parts[1], send=int(parts[2]))


@dataclass(frozen=True)
class TaskMessage:
    task: str
    task_id: str
    args: list[Any]

    @property
    def dispatch(self) -> DispatchId | None:
        return parse_task_id(self.task_id)


def _message(payload: dict[str, Any]) -> TaskMessage:
    headers = payload.get("headers", {})
    body = payload.get("body", "")
    if payload.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    decoded = json.loads(body) if body else [[]]
    return TaskMessage(task=headers.get("task", ""), task_id=headers.get("id", ""), args=decoded[0])


def _keys(client: redis.Redis, queue: str) -> list[bytes]:
    return list(
        dict.fromkeys([queue.encode(), *client.scan_iter(match=f"{queue}{PRIORITY_SEPARATOR}*")])
    )


def queued(client: redis.Redis, queue: str) -> list[TaskMessage]:
    """Every message waiting in a queue, its priority lists included."""
    return snapshot(client, [queue])[0]


def held(client: redis.Redis) -> list[TaskMessage]:
    """Every message delivered to a worker and not yet acknowledged, of any queue."""
    return [_message(json.loads(raw)[0]) for raw in client.hvals(UNACKED_KEY)]


def snapshot(client: redis.Redis, queues: list[str]) -> tuple[list[TaskMessage], list[TaskMessage]]:
    """The messages waiting in the queues, and those of the queues held unacknowledged, read
    in one MULTI/EXEC: read one after the other, a message taken from a queue between the
    two reads would be counted in both."""
    keys = [key for queue in queues for key in _keys(client, queue)]
    pipe = client.pipeline(transaction=True)
    for key in keys:
        pipe.lrange(key, 0, -1)
    pipe.hvals(UNACKED_KEY)
    *lists, unacked = pipe.execute()
    waiting = [_message(json.loads(raw)) for values in lists for raw in values]
    # The unacknowledged hash is one for every queue: keep the entries of these queues
    # (kombu stores each as [payload, exchange, routing key]).
    held = [json.loads(raw) for raw in unacked]
    return waiting, [_message(entry[0]) for entry in held if entry[2] in queues]


def per_step(messages: list[TaskMessage]) -> Counter[tuple[str, str]]:
    """Messages per (request_id, step); ids of another form count under ("?", task_id)."""
    counts: Counter[tuple[str, str]] = Counter()
    for message in messages:
        dispatch = message.dispatch
        if dispatch is None:
            counts[("?", message.task_id)] += 1
        else:
            counts[(dispatch.request_id, dispatch.step)] += 1
    return counts
