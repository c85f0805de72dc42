"""The flow, written once: the steps a request goes through (route, then generate and score
per tier), the task and message id of each, how a step is handed on, and the one path by
which any message reaches the broker (``send_task``): the producer, the task shells, the
sweeper and the callbacks all send through here.

A step is recorded in ``dispatches`` in the transaction that decides it is needed, and its
message is sent after that transaction commits. A worker that dies between the two leaves a
recorded step with no message, which the sweeper finds and re-sends; a message is never
sent for a step the database does not know. A callback is recorded the same way (its
``callback_deliveries`` row, written by the transaction that ends the request) and its
message sent by a listener on every session's commit, below: every process that ends a
request imports this module to send."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

from db.queries import CALLBACKS_TO_SEND
from workers.app.names import TASK_CALLBACK, TASK_GENERATE, TASK_ROUTE, TASK_SCORE

log = logging.getLogger(__name__)

StepKind = Literal["route", "generate", "score"]
TASKS: dict[str, str] = {"route": TASK_ROUTE, "generate": TASK_GENERATE, "score": TASK_SCORE}


@dataclass(frozen=True, order=True)
class Step:
    """One unit of work on a request: ``route``, ``generate:TIER`` or ``score:TIER``."""

    kind: StepKind
    tier: str | None = None

    def __post_init__(self) -> None:
        if (self.kind == "route") != (self.tier is None):
            raise ValueError(f"step {self.kind!r} with tier {self.tier!r}")

    @property
    def key(self) -> str:
        return self.kind if self.tier is None else f"{self.kind}:{self.tier}"

    @classmethod
    def parse(cls, key: str) -> Step:
        kind, _, tier = key.partition(":")
        if kind == "route" and not tier:
            return cls("route")
        if kind in ("generate", "score") and tier:
            return cls(kind, tier)  # type: ignore[arg-type]
        raise ValueError(f"unknown step {key!r}")

    @property
    def task_name(self) -> str:
        return TASKS[self.kind]

    def args(self, request_id: str) -> list[str]:
        return [request_id] if self.tier is None else [request_id, self.tier]


ROUTE = Step("route")


def generate(tier: str) -> Step:
    return Step("generate", tier)


def score(tier: str) -> Step:
    return Step("score", tier)


def task_id(step: Step, request_id: str, send: int) -> str:
    """The message id of the ``send``-th message for a step: a queue can be read per
    (request, step), which is how the sweeper tells a waiting message from a lost one."""
    return f"{step.key}/{request_id}/{send}"


def parse_task_id(message_id: str) -> tuple[str, str] | None:
    """(request id, step key) of a message id made by ``task_id``; None for any other."""
    parts = message_id.split("/")
    if len(parts) != 3:
        return None
    return parts[1], parts[0]


@dataclass(frozen=True)
class Send:
    """A message to send once the transaction that recorded its step has committed."""

    request_id: str
    step: Step
    number: int = 1


def celery() -> Celery:
    """This process's Celery app. Imported when first sent through, not with this module:
    building the app reads the settings and picks the broker's transport, which a process
    that imports the flow only to name steps (the HTTP API before its first request) must
    not do."""
    from workers.app.celery_app import app

    return app


def send_task(
    app: Celery,
    name: str,
    args: Sequence[Any],
    *,
    kwargs: dict[str, Any] | None = None,
    task_id: str | None = None,
    countdown: float | None = None,
    retries: int = 0,
) -> bool:
    """Send one message; False when the broker refuses it. Every message is recorded in the
    database before it is sent (a step, a callback delivery), and the sweep sends it again,
    so a refusal never fails the caller: it is logged on one line (an outage would log the
    same traceback for every message)."""
    try:
        app.send_task(
            name,
            args=list(args),
            kwargs=kwargs,
            task_id=task_id,
            countdown=countdown,
            retries=retries,
        )
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        log.warning(
            "broker unavailable (%s: %s); %s left to the sweep",
            type(exc).__name__,
            reason,
            task_id or name,
        )
        return False
    return True


def send(app: Celery, sends: Iterable[Send]) -> bool:
    """Send each message; whether every one went."""
    sent = [
        send_task(
            app,
            message.step.task_name,
            message.step.args(message.request_id),
            task_id=task_id(message.step, message.request_id, message.number),
        )
        for message in sends
    ]
    return all(sent)


def sends_for(request_id: str, steps: Sequence[Step]) -> list[Send]:
    return [Send(request_id, step) for step in steps]


def send_callbacks(
    request_ids: Sequence[str],
    *,
    countdown: float | None = None,
    attempt: int = 1,
    refusals: int = 0,
) -> None:
    """A callback message for each request: its ``attempt``-th, or the one that found its
    key's slots taken ``refusals`` times."""
    for request_id in request_ids:
        send_task(
            celery(),
            TASK_CALLBACK,
            [request_id],
            kwargs={"refusals": refusals} if refusals else None,
            countdown=countdown,
            task_id=f"callback/{request_id}/{attempt}" + (f"/wait{refusals}" if refusals else ""),
        )


@event.listens_for(Session, "after_commit")
def _send_recorded(session: Session) -> None:
    """Send the callbacks the committed transaction recorded (``queries.record_callbacks``)."""
    recorded = session.info.pop(CALLBACKS_TO_SEND, None)
    if recorded:
        send_callbacks(recorded)


@event.listens_for(Session, "after_rollback")
def _forget_recorded(session: Session) -> None:
    session.info.pop(CALLBACKS_TO_SEND, None)
