"""Labelled pairs: the prompts scored on two or more tiers (the exploration sample), from
which the router is trained and evaluated."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import GenerationRequest, QualityScore

__all__ = [
    "labelled_pairs",
    "labelled_prompts",
    "training_pairs",
]


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
