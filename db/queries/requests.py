"""Generation requests: one or a batch read, their state moved (conditionally: a late or
duplicate delivery changes nothing, and an end records the request's callback in the same
transaction), a failure, a cancel, and the API's listing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from db.models import (
    FINAL_STATUSES,
    OPEN_STEP_STATUSES,
    Dispatch,
    GenerationRequest,
    RoutingDecision,
    Status,
    StepStatus,
)
from db.queries.callbacks import record_callbacks
from db.queries.common import as_datetime

__all__ = [
    "Cancellation",
    "RequestFilter",
    "cancel",
    "count_final",
    "fail",
    "get_request",
    "get_requests",
    "list_requests",
    "request_by_idempotency_key",
    "transition",
    "transition_many",
]


def get_request(session: Session, request_id: str) -> GenerationRequest | None:
    return session.get(GenerationRequest, request_id)


def get_requests(session: Session, request_ids: Sequence[str]) -> dict[str, GenerationRequest]:
    if not request_ids:
        return {}
    rows = session.scalars(
        select(GenerationRequest).where(GenerationRequest.id.in_(list(request_ids)))
    )
    return {row.id: row for row in rows}


def request_by_idempotency_key(
    session: Session, idempotency_key: str, api_key_id: int | None
) -> GenerationRequest | None:
    """The request made with ``idempotency_key`` by the API key ``api_key_id`` (None: by no
    key, as the CLI makes them): a key is its caller's, two callers may use the same one."""
    owner = (
        GenerationRequest.api_key_id.is_(None)
        if api_key_id is None
        else GenerationRequest.api_key_id == api_key_id
    )
    return session.scalar(
        select(GenerationRequest).where(GenerationRequest.idempotency_key == idempotency_key, owner)
    )


def count_final(session: Session, request_ids: Sequence[str]) -> int:
    """How many of these requests are final (done, failed or cancelled)."""
    finished = session.scalar(
        select(func.count()).where(
            GenerationRequest.id.in_(list(request_ids)),
            GenerationRequest.status.in_(FINAL_STATUSES),
        )
    )
    return int(finished or 0)


def transition(
    session: Session,
    request_id: str,
    *,
    from_status: Status | Sequence[Status],
    to_status: Status,
    reason: str | None = None,
) -> bool:
    """Move a request to ``to_status`` only if it is in ``from_status``. True if it moved.
    A move to a final state records the request's callback in the same transaction."""
    sources = [from_status] if isinstance(from_status, Status) else list(from_status)
    values: dict[str, Any] = {"status": to_status, "updated_at": func.now()}
    if reason is not None:
        values["failure_reason"] = reason[:4000]
    moved = session.execute(
        update(GenerationRequest)
        .where(GenerationRequest.id == request_id, GenerationRequest.status.in_(sources))
        .values(**values)
        .returning(GenerationRequest.id, GenerationRequest.callback_url)
    ).all()
    if to_status in FINAL_STATUSES:
        _record_callbacks_of(session, moved)
    return bool(moved)


def transition_many(
    session: Session, request_ids: Sequence[str], *, from_status: Status, to_status: Status
) -> set[str]:
    """``transition`` for many requests (callbacks included); the ids that moved."""
    if not request_ids:
        return set()
    moved = session.execute(
        update(GenerationRequest)
        .where(
            GenerationRequest.id.in_(list(request_ids)),
            GenerationRequest.status == from_status,
        )
        .values(status=to_status, updated_at=func.now())
        .returning(GenerationRequest.id, GenerationRequest.callback_url)
    ).all()
    if to_status in FINAL_STATUSES:
        _record_callbacks_of(session, moved)
    return {request_id for request_id, _ in moved}


def _record_callbacks_of(session: Session, moved: Sequence[Any]) -> None:
    """The callbacks of requests that just ended: no statement when none asked for one."""
    wanted = sorted(request_id for request_id, url in moved if url is not None)
    if wanted:
        record_callbacks(session, wanted)


def fail(session: Session, request_id: str, reason: str) -> bool:
    """Final failure with a reason, from any state that is not already final; the steps
    still open are closed with it, so the sweeper chases none of them."""
    failed = transition(
        session,
        request_id,
        from_status=(Status.QUEUED, Status.ROUTED),
        to_status=Status.FAILED,
        reason=reason,
    )
    if failed:
        session.execute(
            update(Dispatch)
            .where(Dispatch.request_id == request_id, Dispatch.status.in_(OPEN_STEP_STATUSES))
            .values(status=StepStatus.ABANDONED, finished_at=func.now())
        )
    return failed


@dataclass(frozen=True)
class Cancellation:
    """A cancel's outcome: ``status`` is the request's state after it; ``refusal`` says why
    it was not cancelled (None when it was, now or before)."""

    status: Status
    refusal: str | None = None


def cancel(session: Session, request_id: str, *, early_steps: Sequence[str]) -> Cancellation | None:
    """Cancel a request that has not started generating: queued, or routed with no step but
    ``early_steps`` (the route) started. None for an unknown request.

    The request's row is locked first, so a routing transaction in flight has committed (its
    steps are seen) or waits and then finds the request cancelled (``workers.stages``); its
    later steps are locked next, so a worker starting one either went first (refused here)
    or waits and finds the step closed. The state moves in one conditional UPDATE, and every
    open step is closed with it: nothing is left half-written, and nothing to sweep."""
    status = session.scalar(
        select(GenerationRequest.status).where(GenerationRequest.id == request_id).with_for_update()
    )
    if status is None:
        return None
    status = Status(status)
    if status in FINAL_STATUSES:
        return Cancellation(status, None if status is Status.CANCELLED else f"it is {status}")
    later = session.execute(
        select(Dispatch.step, Dispatch.started_at)
        .where(Dispatch.request_id == request_id, Dispatch.step.not_in(list(early_steps)))
        .order_by(Dispatch.id)
        .with_for_update()
    ).all()
    started = sorted((at, step) for step, at in later if at is not None)
    if started:
        at, step = started[0]
        return Cancellation(status, f"{step} started at {as_datetime(at).isoformat()}")
    if not transition(
        session,
        request_id,
        from_status=(Status.QUEUED, Status.ROUTED),
        to_status=Status.CANCELLED,
    ):
        raise RuntimeError(f"request {request_id} changed state under its lock")
    session.execute(
        update(Dispatch)
        .where(Dispatch.request_id == request_id, Dispatch.status.in_(OPEN_STEP_STATUSES))
        .values(status=StepStatus.ABANDONED, finished_at=func.now())
    )
    return Cancellation(Status.CANCELLED)


@dataclass(frozen=True)
class RequestFilter:
    """Which requests a listing shows. ``owner``: one API key's (None: everyone's)."""

    owner: int | None = None
    status: Status | None = None
    tier: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    idempotency_key: str | None = None


def list_requests(
    session: Session,
    where: RequestFilter,
    *,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> list[GenerationRequest]:
    """Requests newest first, by (created_at, id): the ``limit`` that come after ``before``
    (the last one of the previous page). The order and the owner are those of the indexes
    ``ix_generation_requests_created_at_id`` and ``..._api_key_created_at``, so a page is an
    index range scan whatever the table's size; the other conditions filter along it."""
    query = select(GenerationRequest)
    if where.owner is not None:
        query = query.where(GenerationRequest.api_key_id == where.owner)
    if where.status is not None:
        query = query.where(GenerationRequest.status == where.status)
    if where.tier is not None:
        # The tier that answers; the decision is found by its unique request_id.
        query = query.join(
            RoutingDecision, RoutingDecision.request_id == GenerationRequest.id
        ).where(RoutingDecision.tier == where.tier)
    if where.created_after is not None:
        query = query.where(GenerationRequest.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(GenerationRequest.created_at < where.created_before)
    if where.idempotency_key is not None:
        query = query.where(GenerationRequest.idempotency_key == where.idempotency_key)
    if before is not None:
        query = query.where(
            tuple_(GenerationRequest.created_at, GenerationRequest.id) < tuple_(*before)
        )
    query = query.order_by(GenerationRequest.created_at.desc(), GenerationRequest.id.desc())
    return list(session.scalars(query.limit(limit)))
