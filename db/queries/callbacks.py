"""Callbacks (the outbox): a delivery recorded with the end of its request, its attempts
claimed and settled one at a time, the sweeper's overdue ones, and what the API shows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, select, update
from sqlalchemy.orm import Session

from db.models import ApiKey, CallbackAttempt, CallbackDelivery, CallbackState, GenerationRequest
from db.queries.common import dialect_insert, insert_ignore

__all__ = [
    "CALLBACKS_TO_SEND",
    "CallbackClaim",
    "CallbackOutcome",
    "callback_attempts",
    "callback_delivery",
    "callback_secret_of",
    "claim_callback",
    "overdue_callbacks",
    "record_callbacks",
    "settle_callback",
]


#: ``Session.info`` key: the requests whose callback this transaction recorded, which
#: ``workers.stages.callbacks`` sends once the transaction has committed.
CALLBACKS_TO_SEND = "t2iroute.callbacks_to_send"


def record_callbacks(session: Session, request_ids: Sequence[str]) -> list[str]:
    """A pending callback delivery for each of these requests that has a callback URL, once.
    ``transition`` calls it in the transaction that ends a request, so that the end and the
    promise of its callback commit together, whoever ended it. The request ids recorded now
    are also noted in ``session.info`` for sending after commit, and returned."""
    if not request_ids:
        return []
    source = select(
        GenerationRequest.id,
        GenerationRequest.callback_url,
        literal(CallbackState.PENDING.value),
        literal(0),
    ).where(
        GenerationRequest.id.in_(list(request_ids)), GenerationRequest.callback_url.is_not(None)
    )
    statement = (
        dialect_insert(session, CallbackDelivery)
        .from_select(["request_id", "url", "state", "attempts"], source)
        .on_conflict_do_nothing()
        .returning(CallbackDelivery.request_id)
    )
    recorded = list(session.scalars(statement))
    if recorded:
        session.info.setdefault(CALLBACKS_TO_SEND, []).extend(recorded)
    return recorded


@dataclass(frozen=True)
class CallbackClaim:
    """The right to make attempt ``number`` of a delivery, held until ``held_until``."""

    delivery_id: int
    request_id: str
    url: str
    number: int
    held_until: datetime


def claim_callback(
    session: Session, request_id: str, *, due_by: datetime, hold_until: datetime
) -> CallbackClaim | None:
    """Take the next attempt of a request's pending callback that is due by ``due_by``: one
    conditional statement counts the attempt and moves ``next_attempt_at`` to ``hold_until``,
    so that no other message claims it while this attempt is in flight. None when the
    callback is delivered, failed, not due, or claimed by another: nothing to send."""
    row = session.execute(
        update(CallbackDelivery)
        .where(
            CallbackDelivery.request_id == request_id,
            CallbackDelivery.state == CallbackState.PENDING,
            CallbackDelivery.next_attempt_at <= due_by,
        )
        .values(attempts=CallbackDelivery.attempts + 1, next_attempt_at=hold_until)
        .returning(CallbackDelivery.id, CallbackDelivery.url, CallbackDelivery.attempts)
    ).first()
    if row is None:
        return None
    delivery_id, url, number = row
    return CallbackClaim(int(delivery_id), request_id, url, int(number), hold_until)


@dataclass(frozen=True)
class CallbackOutcome:
    """How one attempt went, and what the delivery becomes: ``state``, due again at
    ``next_attempt_at`` when still pending."""

    state: CallbackState
    status_code: int | None
    error: str | None
    duration_ms: float
    attempted_at: datetime
    worker: str | None = None
    next_attempt_at: datetime | None = None


def settle_callback(session: Session, claim: CallbackClaim, outcome: CallbackOutcome) -> bool:
    """Record the attempt and move the delivery to its outcome's state, if the claim still
    holds (no later attempt has been claimed since). True if the delivery moved."""
    changes: dict[str, Any] = {
        "state": outcome.state,
        "last_status": outcome.status_code,
        "last_error": None if outcome.error is None else outcome.error[:4000],
    }
    if outcome.state is CallbackState.DELIVERED:
        changes["delivered_at"] = func.now()
    if outcome.next_attempt_at is not None:
        changes["next_attempt_at"] = outcome.next_attempt_at
    insert_ignore(
        session,
        CallbackAttempt,
        {
            "delivery_id": claim.delivery_id,
            "number": claim.number,
            "status_code": outcome.status_code,
            "error": None if outcome.error is None else outcome.error[:4000],
            "duration_ms": outcome.duration_ms,
            "worker": outcome.worker,
            "attempted_at": outcome.attempted_at,
        },
    )
    result = session.execute(
        update(CallbackDelivery)
        .where(
            CallbackDelivery.id == claim.delivery_id,
            CallbackDelivery.state == CallbackState.PENDING,
            CallbackDelivery.attempts == claim.number,
        )
        .values(**changes)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def overdue_callbacks(session: Session, cutoff: datetime, now: datetime, limit: int) -> list[str]:
    """Pending callbacks due before ``cutoff``: their message was lost, or the worker of an
    attempt died before settling it. Each is made due ``now``, so that the next sweep leaves
    it alone while the message sent for it now waits; the request ids, oldest first."""
    overdue = (
        select(CallbackDelivery.id)
        .where(
            CallbackDelivery.state == CallbackState.PENDING,
            CallbackDelivery.next_attempt_at < cutoff,
        )
        .order_by(CallbackDelivery.next_attempt_at)
        .limit(limit)
    )
    rows = session.execute(
        update(CallbackDelivery)
        .where(
            CallbackDelivery.id.in_(overdue.scalar_subquery()),
            CallbackDelivery.state == CallbackState.PENDING,
            CallbackDelivery.next_attempt_at < cutoff,
        )
        .values(next_attempt_at=now)
        .returning(CallbackDelivery.request_id, CallbackDelivery.created_at)
    )
    return [rid for rid, _ in sorted(rows, key=lambda row: row[1])]


def callback_delivery(session: Session, request_id: str) -> CallbackDelivery | None:
    return session.scalar(select(CallbackDelivery).where(CallbackDelivery.request_id == request_id))


def callback_attempts(session: Session, request_id: str) -> list[CallbackAttempt]:
    """A request's callback attempts, first first."""
    return list(
        session.scalars(
            select(CallbackAttempt)
            .join(CallbackDelivery, CallbackDelivery.id == CallbackAttempt.delivery_id)
            .where(CallbackDelivery.request_id == request_id)
            .order_by(CallbackAttempt.number)
        )
    )


def callback_secret_of(session: Session, api_key_id: int) -> str | None:
    """The callback secret of the API key that made a request (revoked or not: the request
    was made while it held)."""
    return session.scalar(select(ApiKey.callback_secret).where(ApiKey.id == api_key_id))
