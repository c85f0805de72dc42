"""Generations (the images) and their quality scores, for one request or a batch."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Generation, QualityScore

__all__ = [
    "generations_of",
    "get_generation",
    "get_generations",
    "mean_quality_of",
    "quality_scores_of",
    "scored_tiers",
    "scored_tiers_many",
]


def get_generation(session: Session, request_id: str, tier: str) -> Generation | None:
    return session.scalar(
        select(Generation).where(Generation.request_id == request_id, Generation.tier == tier)
    )


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


def quality_scores_of(session: Session, request_id: str) -> list[QualityScore]:
    return list(
        session.scalars(
            select(QualityScore)
            .where(QualityScore.request_id == request_id)
            .order_by(QualityScore.id)
        )
    )
