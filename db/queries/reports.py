"""Reads for reports and scrapes: requests counted by state, and what the budget paid for
since a moment (the API's spend report)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Generation, GenerationRequest, RoutingDecision, Status

__all__ = [
    "Spend",
    "spend_since",
    "status_counts",
]


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(GenerationRequest.status, func.count()).group_by(GenerationRequest.status)
    )
    return {Status(status).value: int(n) for status, n in rows}


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
