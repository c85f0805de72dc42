"""The steps of a request (``dispatches``): recorded once, started and closed by the
deliveries of their messages (for one request or a batch), failed attempts counted, and the
sweeper's reads and claims of the steps whose message was lost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, case, column, func, select, update, values
from sqlalchemy.orm import Session

from db.models import OPEN_STEP_STATUSES, Dispatch, StepStatus
from db.queries.common import as_datetime, dialect_insert

__all__ = [
    "OverdueStep",
    "StepStart",
    "claim_resends",
    "fail_attempt",
    "finish_step",
    "finish_steps",
    "mark_seen",
    "overdue_steps",
    "record_steps",
    "record_steps_many",
    "start_step",
    "start_steps",
    "step_status",
    "steps_of",
]


def record_steps(session: Session, request_id: str, steps: Sequence[str]) -> list[str]:
    """Record the steps a request now needs; return those not recorded before, whose
    messages the caller sends after commit (a redelivered hand-off sends nothing twice)."""
    recorded = record_steps_many(session, [(request_id, step) for step in steps])
    return [step for step in steps if (request_id, step) in recorded]


def record_steps_many(session: Session, steps: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """``record_steps`` for many requests: the (request id, step) pairs not recorded before."""
    if not steps:
        return set()
    statement = (
        dialect_insert(session, Dispatch)
        .values([{"request_id": rid, "step": step} for rid, step in dict.fromkeys(steps)])
        .on_conflict_do_nothing()
        .returning(Dispatch.request_id, Dispatch.step)
    )
    return {(rid, step) for rid, step in session.execute(statement)}


def _open_steps(request_ids: Sequence[str], step: str) -> tuple[ColumnElement[bool], ...]:
    """The conditions that pick one step of these requests while it is open."""
    return (
        Dispatch.request_id.in_(list(request_ids)),
        Dispatch.step == step,
        Dispatch.status.in_(OPEN_STEP_STATUSES),
    )


@dataclass(frozen=True)
class StepStart:
    """A delivery that found its step open. ``failures`` counts the holder that died before
    it, if the broker said this delivery is a redelivery of a message a worker held."""

    failures: int
    starts: int


def start_step(
    session: Session, request_id: str, step: str, *, redelivered: bool
) -> StepStart | None:
    """Mark a step running for this delivery. None when the step is not open (done, given
    up, or never needed): the delivery is a duplicate and has nothing to do."""
    return start_steps(
        session, [request_id], step, redelivered=[request_id] if redelivered else []
    ).get(request_id)


def start_steps(
    session: Session, request_ids: Sequence[str], step: str, *, redelivered: Sequence[str] = ()
) -> dict[str, StepStart]:
    """``start_step`` for the deliveries of one step of many requests; ``redelivered`` names
    the requests whose message the broker delivered again. Requests whose step is not open
    are left out (their deliveries are duplicates)."""
    if not request_ids:
        return {}
    again = sorted(set(redelivered))
    died = (
        case(
            (
                (Dispatch.status == StepStatus.RUNNING) & Dispatch.request_id.in_(again),
                1,
            ),
            else_=0,
        )
        if again
        else 0
    )
    rows = session.execute(
        update(Dispatch)
        .where(*_open_steps(request_ids, step))
        .values(
            status=StepStatus.RUNNING,
            starts=Dispatch.starts + 1,
            failures=Dispatch.failures + died,
            started_at=func.now(),
        )
        .returning(Dispatch.request_id, Dispatch.failures, Dispatch.starts)
    )
    return {rid: StepStart(failures=int(f), starts=int(s)) for rid, f, s in rows}


def finish_step(
    session: Session, request_id: str, step: str, status: StepStatus = StepStatus.DONE
) -> bool:
    """Close an open step. True if this call closed it."""
    return finish_steps(session, [request_id], step, status) > 0


def finish_steps(
    session: Session, request_ids: Sequence[str], step: str, status: StepStatus = StepStatus.DONE
) -> int:
    """Close one step of many requests where it is open; how many this call closed."""
    if not request_ids:
        return 0
    result = session.execute(
        update(Dispatch)
        .where(*_open_steps(request_ids, step))
        .values(status=status, finished_at=func.now())
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def fail_attempt(session: Session, request_id: str, step: str, error: str) -> int | None:
    """Count one failed attempt of an open step and return the count (None if closed)."""
    return session.scalar(
        update(Dispatch)
        .where(*_open_steps([request_id], step))
        .values(
            failures=Dispatch.failures + 1,
            status=StepStatus.PENDING,
            last_error=error[:4000],
        )
        .returning(Dispatch.failures)
    )


def step_status(session: Session, request_id: str, step: str) -> StepStatus | None:
    status = session.scalar(
        select(Dispatch.status).where(Dispatch.request_id == request_id, Dispatch.step == step)
    )
    return None if status is None else StepStatus(status)


def steps_of(session: Session, request_id: str) -> list[Dispatch]:
    return list(
        session.scalars(
            select(Dispatch).where(Dispatch.request_id == request_id).order_by(Dispatch.id)
        )
    )


@dataclass(frozen=True)
class OverdueStep:
    id: int
    request_id: str
    step: str
    status: StepStatus
    starts: int
    sends: int
    last_sign: datetime
    started_at: datetime | None


def overdue_steps(session: Session, cutoff: datetime, limit: int) -> list[OverdueStep]:
    """Open steps with no sign of life since ``cutoff``: not sent, started or seen waiting
    in the broker since then. Candidates for the sweeper's broker check, oldest first."""
    signs = [
        Dispatch.dispatched_at,
        func.coalesce(Dispatch.started_at, Dispatch.dispatched_at),
        func.coalesce(Dispatch.seen_at, Dispatch.dispatched_at),
    ]
    # SQLite's many-argument max() is PostgreSQL's greatest().
    sqlite = session.get_bind().dialect.name == "sqlite"
    last_sign = (func.max if sqlite else func.greatest)(*signs).label("last_sign")
    rows = session.execute(
        select(
            Dispatch.id,
            Dispatch.request_id,
            Dispatch.step,
            Dispatch.status,
            Dispatch.starts,
            Dispatch.sends,
            last_sign,
            Dispatch.started_at,
        )
        # finished_at IS NULL is what ix_dispatches_unfinished holds: the open steps only,
        # however many are done.
        .where(
            Dispatch.finished_at.is_(None),
            Dispatch.status.in_(OPEN_STEP_STATUSES),
            last_sign < cutoff,
        )
        .order_by(Dispatch.dispatched_at)
        .limit(limit)
    )
    return [
        OverdueStep(
            int(i),
            rid,
            step,
            StepStatus(status),
            int(starts),
            int(sends),
            as_datetime(sign),
            None if started is None else as_datetime(started),
        )
        for i, rid, step, status, starts, sends, sign, started in rows
    ]


def mark_seen(session: Session, step_ids: Sequence[int], now: datetime) -> None:
    if step_ids:
        session.execute(update(Dispatch).where(Dispatch.id.in_(step_ids)).values(seen_at=now))


def claim_resends(
    session: Session, overdue: Sequence[OverdueStep], now: datetime
) -> dict[int, int]:
    """Count one more message for each lost step, in one statement, except a step a worker
    or another sweeper touched since it was read (its status, starts or sends moved: it is
    not lost). Step id -> its new send number, for the steps claimed."""
    if not overdue:
        return {}
    fields = (Dispatch.id, Dispatch.status, Dispatch.starts, Dispatch.sends)
    read = (
        values(*(column(field.key, field.type) for field in fields), name="read")
        .data([(step.id, step.status, step.starts, step.sends) for step in overdue])
        .cte("read")
    )
    rows = session.execute(
        update(Dispatch)
        # id IN as well as the join: a planner that guesses a small table would otherwise
        # hash the read rows and scan every step for them.
        .where(Dispatch.id.in_([step.id for step in overdue]))
        .where(*(field == read.c[field.key] for field in fields))
        .values(sends=Dispatch.sends + 1, dispatched_at=now, status=StepStatus.PENDING)
        .returning(Dispatch.id, Dispatch.sends)
    )
    return {int(step_id): int(sends) for step_id, sends in rows}
