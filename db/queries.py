"""The queries the workers need. Inserts are ``ON CONFLICT DO NOTHING`` and state changes
are conditional, so a late or duplicate delivery changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    case,
    column,
    func,
    inspect,
    literal,
    select,
    tuple_,
    update,
    values,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    FINAL_STATUSES,
    OPEN_STEP_STATUSES,
    ApiKey,
    Base,
    CallbackAttempt,
    CallbackDelivery,
    CallbackState,
    Dispatch,
    Generation,
    GenerationRequest,
    QualityScore,
    RouterEventRow,
    RouterVersion,
    RoutingDecision,
    Status,
    StepStatus,
    TierHealth,
)


def _insert(session: Session, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT, which knows ON CONFLICT."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise RuntimeError(f"unsupported database dialect {dialect!r}")


def insert_ignore(session: Session, model: type[Base], values: dict[str, Any]) -> bool:
    """Insert one row unless a unique constraint already holds it. True if inserted.
    RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT DO NOTHING."""
    statement = _insert(session, model).values(**values).on_conflict_do_nothing()
    key = inspect(model).primary_key[0]
    return session.execute(statement.returning(key)).first() is not None


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


def database_now(session: Session) -> datetime:
    """The database's clock, the one every worker shares (not this host's)."""
    return _as_datetime(session.scalar(select(func.now())))


# --- steps (dispatches) --------------------------------------------------------------------


def record_steps(session: Session, request_id: str, steps: Sequence[str]) -> list[str]:
    """Record the steps a request now needs; return those not recorded before, whose
    messages the caller sends after commit (a redelivered hand-off sends nothing twice)."""
    recorded = record_steps_many(session, [(request_id, step) for step in steps])
    return [step for step in steps if (request_id, step) in recorded]


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


def finish_step(
    session: Session, request_id: str, step: str, status: StepStatus = StepStatus.DONE
) -> bool:
    """Close an open step. True if this call closed it."""
    return finish_steps(session, [request_id], step, status) > 0


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
            _as_datetime(sign),
            None if started is None else _as_datetime(started),
        )
        for i, rid, step, status, starts, sends, sign, started in rows
    ]


def _as_datetime(value: object) -> datetime:
    """An aware UTC timestamp; SQLite hands back naive ones, or text for an expression."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(moment, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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


# --- tier health (circuit breaker) -----------------------------------------------------------


def record_tier_failure(
    session: Session, tier: str, error: str, *, threshold: int, cooldown_seconds: float
) -> bool:
    """Count a failed generation on a tier; open its breaker at ``threshold`` failures in a
    row. True when this failure opened it (or kept it open)."""
    failures = session.scalar(
        _insert(session, TierHealth)
        .values(tier=tier, consecutive_failures=1, last_error=error[:4000])
        .on_conflict_do_update(
            index_elements=[TierHealth.tier],
            set_={
                "consecutive_failures": TierHealth.consecutive_failures + 1,
                "last_error": error[:4000],
                "updated_at": func.now(),
            },
        )
        .returning(TierHealth.consecutive_failures)
    )
    if failures is None or failures < threshold:
        return False
    session.execute(
        update(TierHealth)
        .where(TierHealth.tier == tier)
        .values(open_until=database_now(session) + timedelta(seconds=cooldown_seconds))
    )
    return True


def record_tier_success(session: Session, tier: str) -> None:
    session.execute(
        update(TierHealth)
        .where(TierHealth.tier == tier, TierHealth.consecutive_failures > 0)
        .values(consecutive_failures=0, open_until=None, updated_at=func.now())
    )


def tier_failure_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(TierHealth.tier, TierHealth.consecutive_failures))
    return {tier: int(count) for tier, count in rows}


def unavailable_tiers(session: Session) -> dict[str, str]:
    """Tiers whose breaker is open now, with their last error."""
    rows = session.execute(
        select(TierHealth.tier, TierHealth.last_error).where(
            TierHealth.open_until > database_now(session)
        )
    )
    return {tier: error or "" for tier, error in rows}


def get_request(session: Session, request_id: str) -> GenerationRequest | None:
    return session.get(GenerationRequest, request_id)


def get_decision(
    session: Session, request_id: str, *, for_update: bool = False
) -> RoutingDecision | None:
    statement = select(RoutingDecision).where(RoutingDecision.request_id == request_id)
    return session.scalar(statement.with_for_update() if for_update else statement)


def get_generation(session: Session, request_id: str, tier: str) -> Generation | None:
    return session.scalar(
        select(Generation).where(Generation.request_id == request_id, Generation.tier == tier)
    )


def wanted_tiers(decision: RoutingDecision) -> tuple[str, ...]:
    """An exploration sample is generated on both tiers; any other request on the tier that
    serves its answer. Only the answer's tier decides when the request is done."""
    escalated = [e["to"] for e in decision.escalations]
    if decision.escalating_to is not None:
        escalated.append(decision.escalating_to)
    return tiers_wanted(decision.tier, [*decision.explored, *escalated])


def tiers_wanted(answer: str, others: Sequence[str]) -> tuple[str, ...]:
    """The answer's tier first, then each other tier once."""
    return (answer, *dict.fromkeys(t for t in others if t != answer))


def generations_of(session: Session, request_id: str) -> list[Generation]:
    return list(
        session.scalars(
            select(Generation).where(Generation.request_id == request_id).order_by(Generation.id)
        )
    )


def mean_quality_of(session: Session, request_id: str) -> dict[str, float]:
    rows = session.execute(
        select(QualityScore.tier, QualityScore.mean_score).where(
            QualityScore.request_id == request_id
        )
    )
    return {tier: float(score) for tier, score in rows}


def scored_tiers(session: Session, request_id: str, metrics_version: str) -> dict[str, list[float]]:
    rows = session.execute(
        select(QualityScore.tier, QualityScore.scores).where(
            QualityScore.request_id == request_id,
            QualityScore.metrics_version == metrics_version,
        )
    )
    return {tier: list(scores["values"]) for tier, scores in rows}


def recent_predictions(
    session: Session, window: int, router_version: str
) -> list[dict[str, float]]:
    """The router's predicted score of every tier, for its most recent decisions."""
    rows = session.scalars(
        select(RoutingDecision.predicted_quality)
        .where(RoutingDecision.router_version == router_version)
        .order_by(RoutingDecision.id.desc())
        .limit(window)
    )
    return list(rows)


def recent_spend(session: Session, window: int) -> tuple[int, float]:
    """How many of the last ``window`` decisions there are and their mean spend above the
    cheapest tier (explorations included), newest first by primary key."""
    last = (
        select(RoutingDecision.spent).order_by(RoutingDecision.id.desc()).limit(window).subquery()
    )
    count, mean = session.execute(select(func.count(), func.avg(last.c.spent))).one()
    return int(count), float(mean or 0.0)


def active_router_version(session: Session) -> RouterVersion | None:
    return session.scalar(select(RouterVersion).where(RouterVersion.is_active.is_(True)))


def router_version(session: Session, version: str) -> RouterVersion | None:
    return session.scalar(select(RouterVersion).where(RouterVersion.version == version))


def promote_router_version(session: Session, version_id: int) -> None:
    """Make one version the only active one, in one transaction."""
    deactivate_router_versions(session)
    session.execute(
        update(RouterVersion)
        .where(RouterVersion.id == version_id)
        .values(is_active=True, promoted_at=func.now())
    )


def deactivate_router_versions(session: Session) -> None:
    """No version active: the default policy serves (a rollback past the first version)."""
    session.execute(
        update(RouterVersion).where(RouterVersion.is_active.is_(True)).values(is_active=False)
    )
    session.flush()


def record_router_event(
    session: Session,
    version: str,
    event: str,
    *,
    actor: str,
    reason: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one event to a router version's history (``db.models.RouterEvent``)."""
    session.add(
        RouterEventRow(
            version=version, event=event, actor=actor, reason=reason, details=details or {}
        )
    )
    session.flush()


def router_events(session: Session, version: str | None = None) -> list[RouterEventRow]:
    """The history of one version, or of all of them, oldest first."""
    query = select(RouterEventRow).order_by(RouterEventRow.id)
    if version is not None:
        query = query.where(RouterEventRow.version == version)
    return list(session.scalars(query))


def labelled_prompts(
    session: Session, metrics_version: str
) -> list[tuple[str, dict[str, list[float]]]]:
    """Every prompt scored on two or more tiers (the exploration sample), with each tier's
    metric vector: pairs, or any subset of the pool, are built from these at training time."""
    return list(_labelled(session, metrics_version).values())


def _labelled(
    session: Session, metrics_version: str
) -> dict[str, tuple[str, dict[str, list[float]]]]:
    rows = session.execute(
        select(
            GenerationRequest.id, GenerationRequest.prompt, QualityScore.tier, QualityScore.scores
        )
        .join(GenerationRequest, GenerationRequest.id == QualityScore.request_id)
        .where(QualityScore.metrics_version == metrics_version)
        .order_by(GenerationRequest.created_at, GenerationRequest.id)
    )
    labelled: dict[str, tuple[str, dict[str, list[float]]]] = {}
    for request_id, prompt, tier, scores in rows:
        labelled.setdefault(request_id, (prompt, {}))[1][tier] = list(scores["values"])
    return {rid: entry for rid, entry in labelled.items() if len(entry[1]) >= 2}


def training_pairs(
    session: Session, metrics_version: str, reference: str = "edge", other: str = "cloud"
) -> list[tuple[str, list[float], list[float]]]:
    """(prompt, reference tier's metrics, other tier's metrics) of every prompt scored on both."""
    return [
        (prompt, ref, oth)
        for _, prompt, ref, oth in labelled_pairs(session, metrics_version, reference, other)
    ]


def labelled_pairs(
    session: Session, metrics_version: str, reference: str, other: str
) -> list[tuple[str, str, list[float], list[float]]]:
    """(request id, prompt, reference tier's metrics, other tier's metrics) of every request
    scored on both, oldest first."""
    return [
        (request_id, prompt, tiers[reference], tiers[other])
        for request_id, (prompt, tiers) in _labelled(session, metrics_version).items()
        if reference in tiers and other in tiers
    ]


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(GenerationRequest.status, func.count()).group_by(GenerationRequest.status)
    )
    return {Status(status).value: int(n) for status, n in rows}


# --- many requests at once (a batch of messages) ---------------------------------------------
#
# The batched stages read and write the requests of a batch in one statement each: a request
# id list (``IN``) on the primary key or the (request_id, step) and (request_id, tier) unique
# indexes, and one step or tier per statement, so every plan is an index lookup per id.


def insert_ignore_many(session: Session, model: type[Base], rows: Sequence[dict[str, Any]]) -> int:
    """Insert the rows no unique constraint already holds; the number inserted."""
    if not rows:
        return 0
    key = inspect(model).primary_key[0]
    statement = _insert(session, model).values(list(rows)).on_conflict_do_nothing()
    return len(session.execute(statement.returning(key)).all())


def get_requests(session: Session, request_ids: Sequence[str]) -> dict[str, GenerationRequest]:
    if not request_ids:
        return {}
    rows = session.scalars(
        select(GenerationRequest).where(GenerationRequest.id.in_(list(request_ids)))
    )
    return {row.id: row for row in rows}


def get_decisions(
    session: Session, request_ids: Sequence[str], *, for_update: bool = False
) -> dict[str, RoutingDecision]:
    """The decisions of these requests; ``for_update`` locks them in id order (two batches
    that share requests then wait for each other instead of deadlocking)."""
    if not request_ids:
        return {}
    statement = (
        select(RoutingDecision)
        .where(RoutingDecision.request_id.in_(sorted(request_ids)))
        .order_by(RoutingDecision.request_id)
    )
    rows = session.scalars(statement.with_for_update() if for_update else statement)
    return {row.request_id: row for row in rows}


def get_generations(
    session: Session, request_ids: Sequence[str], tiers: Sequence[str]
) -> dict[tuple[str, str], Generation]:
    """The images of these requests on these tiers, by (request id, tier). The tiers make
    the lookup selective enough for the (request_id, tier) index on a table with no
    statistics yet (an ``IN`` on request_id alone is estimated at a sixth of the table)."""
    if not request_ids or not tiers:
        return {}
    rows = session.scalars(
        select(Generation).where(
            Generation.request_id.in_(list(request_ids)), Generation.tier.in_(sorted(set(tiers)))
        )
    )
    return {(row.request_id, row.tier): row for row in rows}


def scored_tiers_many(
    session: Session, request_ids: Sequence[str], metrics_version: str
) -> dict[str, dict[str, list[float]]]:
    """``scored_tiers`` of each request (an empty mapping for one not scored yet)."""
    scored: dict[str, dict[str, list[float]]] = {rid: {} for rid in request_ids}
    if not request_ids:
        return scored
    rows = session.execute(
        select(QualityScore.request_id, QualityScore.tier, QualityScore.scores).where(
            QualityScore.request_id.in_(list(request_ids)),
            QualityScore.metrics_version == metrics_version,
        )
    )
    for request_id, tier, scores in rows:
        scored.setdefault(request_id, {})[tier] = list(scores["values"])
    return scored


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


def record_steps_many(session: Session, steps: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """``record_steps`` for many requests: the (request id, step) pairs not recorded before."""
    if not steps:
        return set()
    statement = (
        _insert(session, Dispatch)
        .values([{"request_id": rid, "step": step} for rid, step in dict.fromkeys(steps)])
        .on_conflict_do_nothing()
        .returning(Dispatch.request_id, Dispatch.step)
    )
    return {(rid, step) for rid, step in session.execute(statement)}


# --- callbacks (the outbox) ------------------------------------------------------------------

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
        _insert(session, CallbackDelivery)
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


# --- the HTTP API: cancel, list, reports -----------------------------------------------------


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
        return Cancellation(status, f"{step} started at {_as_datetime(at).isoformat()}")
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


def quality_scores_of(session: Session, request_id: str) -> list[QualityScore]:
    return list(
        session.scalars(
            select(QualityScore)
            .where(QualityScore.request_id == request_id)
            .order_by(QualityScore.id)
        )
    )


@dataclass(frozen=True)
class Spend:
    """The routing decisions made since a moment: how many, the cost units they drew from
    the budget, the requests each tier answered and the images made on each (explorations
    included)."""

    decisions: int
    spent: float
    answers: dict[str, int]
    generations: dict[str, int]


def spend_since(session: Session, since: datetime) -> Spend:
    """What the budget paid for since ``since``, read along the created_at indexes."""
    decisions, spent = session.execute(
        select(func.count(), func.coalesce(func.sum(RoutingDecision.spent), 0.0)).where(
            RoutingDecision.created_at >= since
        )
    ).one()
    answers = session.execute(
        select(RoutingDecision.tier, func.count())
        .where(RoutingDecision.created_at >= since)
        .group_by(RoutingDecision.tier)
    )
    generations = session.execute(
        select(Generation.tier, func.count())
        .where(Generation.created_at >= since)
        .group_by(Generation.tier)
    )
    return Spend(
        decisions=int(decisions),
        spent=float(spent),
        answers={tier: int(n) for tier, n in answers},
        generations={tier: int(n) for tier, n in generations},
    )


def latest_tradeoff(session: Session) -> float | None:
    """The policy's trade-off parameter in its most recent decision."""
    return session.scalar(
        select(RoutingDecision.tradeoff).order_by(RoutingDecision.id.desc()).limit(1)
    )


def router_versions(session: Session, *, lock: bool = False) -> list[RouterVersion]:
    """Every registered router version, oldest first. ``lock`` takes their row locks until
    the transaction ends, so that two promotions or rollbacks (or one and the retraining
    job's promotion) read the serving history one after the other, never both before
    either writes."""
    query = select(RouterVersion).order_by(RouterVersion.id)
    if lock:
        query = query.with_for_update()
    return list(session.scalars(query))
