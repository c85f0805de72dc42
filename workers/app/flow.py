"""The flow, written once: the steps a request goes through (route, then generate and score
per tier), the task and message id of each, and how a step is handed on. The task shells
and the sweeper both send through here.

A step is recorded in ``dispatches`` in the transaction that decides it is needed, and its
message is sent after that transaction commits. A worker that dies between the two leaves a
recorded step with no message, which the sweeper finds and re-sends; a message is never
sent for a step the database does not know."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from celery import Celery

from workers.app.celery_app import TASK_GENERATE, TASK_ROUTE, TASK_SCORE

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


def send(app: Celery, sends: Iterable[Send]) -> None:
    """Send each message. A broker that refuses leaves the step recorded and unsent: the
    sweeper sends it once the broker is back, so this never fails its caller."""
    for message in sends:
        try:
            app.send_task(
                message.step.task_name,
                args=message.step.args(message.request_id),
                task_id=task_id(message.step, message.request_id, message.number),
            )
        except Exception:
            log.warning(
                "broker unavailable; %s of %s left to the sweeper",
                message.step.key,
                message.request_id,
                exc_info=True,
            )


def sends_for(request_id: str, steps: Sequence[Step]) -> list[Send]:
    return [Send(request_id, step) for step in steps]
