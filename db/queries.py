"""The queries the workers need. Inserts are ``ON CONFLICT DO NOTHING`` and state changes
are conditional, so a late or duplicate delivery changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, inspect, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    Base,
    Generation,
    GenerationRequest,
    QualityScore,
    RouterVersion,
    RoutingDecision,
    Status,
    Tier,
    TrainingPair,
)


def insert_ignore(session: Session, model: type[Base], values: dict[str, Any]) -> bool:
    """Insert one row unless a unique constraint already holds it. True if inserted.
    RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT DO NOTHING."""
    dialect = session.get_bind().dialect.name
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(model).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(model).values(**values).on_conflict_do_nothing()
    else:
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
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
    """Move a request to ``to_status`` only if it is in ``from_status``. True if it moved."""
    sources = [from_status] if isinstance(from_status, Status) else list(from_status)
    values: dict[str, Any] = {"status": to_status, "updated_at": func.now()}
    if reason is not None:
        values["failure_reason"] = reason[:4000]
    result = session.execute(
        update(GenerationRequest)
        .where(GenerationRequest.id == request_id, GenerationRequest.status.in_(sources))
        .values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def fail(session: Session, request_id: str, reason: str) -> bool:
    """Final failure with a reason, from any state that is not already final."""
    return transition(
        session,
        request_id,
        from_status=(Status.QUEUED, Status.ROUTED),
        to_status=Status.FAILED,
        reason=reason,
    )


def count_attempt(session: Session, request_id: str) -> int:
    """Count one more delivery that has not (yet) made progress, and return the count.
    Redis keeps no delivery count, so a message that crashes its worker every time is
    recognised here and failed after ``max_attempts``."""
    result = session.execute(
        update(GenerationRequest)
        .where(GenerationRequest.id == request_id)
        .values(attempts=GenerationRequest.attempts + 1, updated_at=func.now())
        .returning(GenerationRequest.attempts)
    )
    attempts = result.scalar_one_or_none()
    if attempts is None:
        raise LookupError(f"no generation request {request_id}")
    return int(attempts)


def record_progress(session: Session, request_id: str) -> None:
    """A stage made progress: the count of attempts without progress starts again."""
    session.execute(
        update(GenerationRequest)
        .where(GenerationRequest.id == request_id)
        .values(attempts=0, updated_at=func.now())
    )


def get_request(session: Session, request_id: str) -> GenerationRequest | None:
    return session.get(GenerationRequest, request_id)


def get_decision(session: Session, request_id: str) -> RoutingDecision | None:
    return session.scalar(select(RoutingDecision).where(RoutingDecision.request_id == request_id))


def get_generation(session: Session, request_id: str, tier: Tier) -> Generation | None:
    return session.scalar(
        select(Generation).where(Generation.request_id == request_id, Generation.tier == tier)
    )


def required_tiers(decision: RoutingDecision) -> tuple[Tier, ...]:
    """An exploration sample is generated on both tiers; any other request on its own tier."""
    return (Tier.EDGE, Tier.CLOUD) if decision.explore else (decision.tier,)


def generations_of(session: Session, request_id: str) -> list[Generation]:
    return list(
        session.scalars(
            select(Generation).where(Generation.request_id == request_id).order_by(Generation.id)
        )
    )


def mean_quality_of(session: Session, request_id: str) -> dict[Tier, float]:
    rows = session.execute(
        select(QualityScore.tier, QualityScore.mean_score).where(
            QualityScore.request_id == request_id
        )
    )
    return {Tier(tier): float(score) for tier, score in rows}


def scored_tiers(
    session: Session, request_id: str, metrics_version: str
) -> dict[Tier, list[float]]:
    rows = session.execute(
        select(QualityScore.tier, QualityScore.scores).where(
            QualityScore.request_id == request_id,
            QualityScore.metrics_version == metrics_version,
        )
    )
    return {Tier(tier): list(scores["values"]) for tier, scores in rows}


def recent_predicted_prs(session: Session, window: int, router_version: str) -> list[float]:
    rows = session.scalars(
        select(RoutingDecision.predicted_prs)
        .where(RoutingDecision.router_version == router_version)
        .order_by(RoutingDecision.id.desc())
        .limit(window)
    )
    return list(rows)


def active_router_version(session: Session) -> RouterVersion | None:
    return session.scalar(select(RouterVersion).where(RouterVersion.is_active.is_(True)))


def router_version(session: Session, version: str) -> RouterVersion | None:
    return session.scalar(select(RouterVersion).where(RouterVersion.version == version))


def promote_router_version(session: Session, version_id: int) -> None:
    """Make one version the only active one, in one transaction."""
    session.execute(
        update(RouterVersion).where(RouterVersion.is_active.is_(True)).values(is_active=False)
    )
    session.flush()
    session.execute(
        update(RouterVersion)
        .where(RouterVersion.id == version_id)
        .values(is_active=True, promoted_at=func.now())
    )


def training_pairs(
    session: Session, metrics_version: str
) -> list[tuple[str, list[float], list[float]]]:
    rows = session.execute(
        select(GenerationRequest.prompt, TrainingPair.edge_scores, TrainingPair.cloud_scores)
        .join(GenerationRequest, GenerationRequest.id == TrainingPair.request_id)
        .where(TrainingPair.metrics_version == metrics_version)
        .order_by(TrainingPair.id)
    )
    return [(prompt, list(edge), list(cloud)) for prompt, edge, cloud in rows]


def stuck_requests(
    session: Session, older_than: timedelta, now: datetime, limit: int = 500
) -> list[str]:
    cutoff = now - older_than
    condition: ColumnElement[bool] = GenerationRequest.status.in_((Status.QUEUED, Status.ROUTED))
    rows = session.scalars(
        select(GenerationRequest.id)
        .where(condition, GenerationRequest.updated_at < cutoff)
        .order_by(GenerationRequest.updated_at)
        .limit(limit)
    )
    return list(rows)


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(GenerationRequest.status, func.count()).group_by(GenerationRequest.status)
    )
    return {Status(status).value: int(n) for status, n in rows}


@dataclass(frozen=True)
class BatchReport:
    done: int
    failed: int
    unfinished: int
    cloud_share: float
    explored: int
    mean_quality: dict[str, float]
    images: int
    failures: list[str]


def batch_report(session: Session, request_ids: Sequence[str]) -> BatchReport:
    """Outcome of a set of requests: states, routing shares, quality per tier."""
    ids = list(request_ids)
    statuses = {
        rid: Status(status)
        for rid, status in session.execute(
            select(GenerationRequest.id, GenerationRequest.status).where(
                GenerationRequest.id.in_(ids)
            )
        )
    }
    tiers = [
        (Tier(tier), bool(explore))
        for tier, explore in session.execute(
            select(RoutingDecision.tier, RoutingDecision.explore).where(
                RoutingDecision.request_id.in_(ids)
            )
        )
    ]
    quality = {
        Tier(tier).value: float(q)
        for tier, q in session.execute(
            select(QualityScore.tier, func.avg(QualityScore.mean_score))
            .where(QualityScore.request_id.in_(ids))
            .group_by(QualityScore.tier)
        )
    }
    images = session.scalar(
        select(func.count()).select_from(Generation).where(Generation.request_id.in_(ids))
    )
    failures = [
        f"{rid}: {reason}"
        for rid, reason in session.execute(
            select(GenerationRequest.id, GenerationRequest.failure_reason).where(
                GenerationRequest.id.in_(ids), GenerationRequest.status == Status.FAILED
            )
        )
    ]
    done = sum(1 for s in statuses.values() if s == Status.DONE)
    failed = sum(1 for s in statuses.values() if s == Status.FAILED)
    return BatchReport(
        done=done,
        failed=failed,
        unfinished=len(ids) - done - failed,
        cloud_share=sum(1 for t, _ in tiers if t == Tier.CLOUD) / len(tiers) if tiers else 0.0,
        explored=sum(1 for _, e in tiers if e),
        mean_quality=quality,
        images=int(images or 0),
        failures=failures,
    )
