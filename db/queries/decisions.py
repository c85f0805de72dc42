"""Routing decisions: one or a batch read, the tiers a decision wants generated, and the
recent decisions that calibration, the API and the scrape read."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import RoutingDecision

__all__ = [
    "get_decision",
    "get_decisions",
    "latest_decision",
    "latest_tradeoff",
    "recent_predictions",
    "recent_spend",
    "tiers_wanted",
    "wanted_tiers",
]


def get_decision(
    session: Session, request_id: str, *, for_update: bool = False
) -> RoutingDecision | None:
    statement = select(RoutingDecision).where(RoutingDecision.request_id == request_id)
    return session.scalar(statement.with_for_update() if for_update else statement)


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


def latest_tradeoff(session: Session) -> float | None:
    """The policy's trade-off parameter in its most recent decision."""
    return session.scalar(
        select(RoutingDecision.tradeoff).order_by(RoutingDecision.id.desc()).limit(1)
    )


def latest_decision(session: Session) -> tuple[float, str] | None:
    """The trade-off parameter and the router version of the most recent decision."""
    row = session.execute(
        select(RoutingDecision.tradeoff, RoutingDecision.router_version)
        .order_by(RoutingDecision.id.desc())
        .limit(1)
    ).first()
    return None if row is None else (float(row[0]), str(row[1]))
