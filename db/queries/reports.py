"""Reads for reports and scrapes: requests counted by state (and answering tier), what the
budget paid for since a moment (the API's spend report), the rows of a batch's outcome and of
a time window (``workers.services.traffic``), the states of the requests recently decided
(``workers.services.telemetry``), and the totals a replay checks its own accounting against
(``workers.offline.replay``). Percentiles and time bins are computed by the callers, so that
every statement here is portable SQL (the embedded demo runs on SQLite)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    Dispatch,
    Generation,
    GenerationRequest,
    QualityScore,
    RouterEventRow,
    RouterVersion,
    RoutingDecision,
    Status,
)

__all__ = [
    "BatchRows",
    "Spend",
    "WindowDecision",
    "batch_rows",
    "count_explored_decisions",
    "count_requests",
    "count_router_events",
    "count_router_versions",
    "generations_by_tier",
    "recent_states",
    "requests_by_state_and_tier",
    "spend_since",
    "status_counts",
    "window_answer_times",
    "window_answers",
    "window_decisions",
    "window_done",
    "window_latencies",
    "window_quality",
    "window_score_times",
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


def requests_by_state_and_tier(
    session: Session, *, created_since: datetime | None = None, in_flight: bool = False
) -> list[tuple[Status, str | None, int]]:
    """Requests counted by state and answering tier (None: not routed yet). ``created_since``
    keeps those created since then (a report's window); ``in_flight`` those queued or routed
    with a step open, read along the partial index of unfinished steps, then by primary key
    (the scrape's gauge)."""
    query = select(GenerationRequest.status, RoutingDecision.tier, func.count())
    if in_flight:
        open_requests = (
            select(Dispatch.request_id).where(Dispatch.finished_at.is_(None)).distinct().subquery()
        )
        query = (
            query.select_from(open_requests)
            .join(GenerationRequest, GenerationRequest.id == open_requests.c.request_id)
            .where(GenerationRequest.status.in_((Status.QUEUED, Status.ROUTED)))
        )
    query = query.outerjoin(RoutingDecision, RoutingDecision.request_id == GenerationRequest.id)
    if created_since is not None:
        query = query.where(GenerationRequest.created_at >= created_since)
    rows = session.execute(query.group_by(GenerationRequest.status, RoutingDecision.tier))
    return [(Status(status), tier, int(n)) for status, tier, n in rows]


def recent_states(session: Session, window: int) -> list[tuple[Status, str, int]]:
    """The states of the requests of the last ``window`` decisions, by answering tier: the
    decisions backwards along their primary key, then their requests by primary key (two
    statements, so that no plan can read the whole request table for them)."""
    recent = session.execute(
        select(RoutingDecision.request_id, RoutingDecision.tier)
        .order_by(RoutingDecision.id.desc())
        .limit(window)
    ).all()
    states = dict(
        session.execute(
            select(GenerationRequest.id, GenerationRequest.status).where(
                GenerationRequest.id.in_([rid for rid, _ in recent])
            )
        ).all()
    )
    counts = Counter((Status(states[rid]), tier) for rid, tier in recent if rid in states)
    return [(state, tier, n) for (state, tier), n in counts.items()]


# --- a batch of requests (t2iroute submit --file, the demo) ---------------------------------


@dataclass(frozen=True)
class BatchRows:
    """What a batch's outcome is made of, in four statements: each request's state and
    failure reason, the tier that answers it, its images as (request id, tier, image path)
    and their mean quality as (request id, tier, score), in the order the database gave them."""

    requests: dict[str, tuple[Status, str | None]]
    answers: dict[str, str]
    images: list[tuple[str, str, str]]
    scores: list[tuple[str, str, float]]


def batch_rows(session: Session, request_ids: Sequence[str]) -> BatchRows:
    ids = list(request_ids)
    requests = {
        request_id: (Status(status), reason)
        for request_id, status, reason in session.execute(
            select(
                GenerationRequest.id, GenerationRequest.status, GenerationRequest.failure_reason
            ).where(GenerationRequest.id.in_(ids))
        )
    }
    answers = {
        request_id: tier
        for request_id, tier in session.execute(
            select(RoutingDecision.request_id, RoutingDecision.tier).where(
                RoutingDecision.request_id.in_(ids)
            )
        )
    }
    images = [
        (request_id, tier, path)
        for request_id, tier, path in session.execute(
            select(Generation.request_id, Generation.tier, Generation.image_path).where(
                Generation.request_id.in_(ids)
            )
        )
    ]
    scores = [
        (request_id, tier, score)
        for request_id, tier, score in session.execute(
            select(QualityScore.request_id, QualityScore.tier, QualityScore.mean_score).where(
                QualityScore.request_id.in_(ids)
            )
        )
    ]
    return BatchRows(requests=requests, answers=answers, images=images, scores=scores)


# --- a time window (t2iroute report): the requests created since a moment -------------------


class WindowDecision(NamedTuple):
    router_version: str
    created_at: datetime
    tradeoff: float
    spent: float


def window_decisions(session: Session, since: datetime) -> list[WindowDecision]:
    """The decisions of the requests created since ``since``, in the order they were made."""
    rows = session.execute(
        select(
            RoutingDecision.router_version,
            RoutingDecision.created_at,
            RoutingDecision.tradeoff,
            RoutingDecision.spent,
        )
        .join(GenerationRequest, GenerationRequest.id == RoutingDecision.request_id)
        .where(GenerationRequest.created_at >= since)
        .order_by(RoutingDecision.id)
    )
    return [WindowDecision(*row) for row in rows]


def window_answers(session: Session, since: datetime) -> dict[str, int]:
    """The requests each tier answers."""
    rows = session.execute(
        select(RoutingDecision.tier, func.count())
        .join(GenerationRequest, GenerationRequest.id == RoutingDecision.request_id)
        .where(GenerationRequest.created_at >= since)
        .group_by(RoutingDecision.tier)
    )
    return {tier: int(n) for tier, n in rows}


def window_latencies(session: Session, since: datetime) -> list[tuple[str, float]]:
    """(tier, generation latency in ms) of every image made."""
    rows = session.execute(
        select(Generation.tier, Generation.latency_ms)
        .join(GenerationRequest, GenerationRequest.id == Generation.request_id)
        .where(GenerationRequest.created_at >= since)
    )
    return [(tier, latency) for tier, latency in rows]


def window_quality(session: Session, since: datetime) -> dict[str, tuple[float, int]]:
    """Per tier, the mean quality of its scored images and how many there are."""
    rows = session.execute(
        select(QualityScore.tier, func.avg(QualityScore.mean_score), func.count())
        .join(GenerationRequest, GenerationRequest.id == QualityScore.request_id)
        .where(GenerationRequest.created_at >= since)
        .group_by(QualityScore.tier)
    )
    return {tier: (float(mean), int(n)) for tier, mean, n in rows}


def window_done(session: Session, since: datetime) -> list[tuple[str, datetime, datetime]]:
    """(answering tier, created, last updated) of every request done."""
    rows = session.execute(
        select(RoutingDecision.tier, GenerationRequest.created_at, GenerationRequest.updated_at)
        .join(GenerationRequest, GenerationRequest.id == RoutingDecision.request_id)
        .where(GenerationRequest.created_at >= since, GenerationRequest.status == Status.DONE)
    )
    return [(tier, created, updated) for tier, created, updated in rows]


def window_answer_times(session: Session, since: datetime) -> list[tuple[str, datetime]]:
    """(answering tier, created) of every request routed."""
    rows = session.execute(
        select(RoutingDecision.tier, GenerationRequest.created_at)
        .join(GenerationRequest, GenerationRequest.id == RoutingDecision.request_id)
        .where(GenerationRequest.created_at >= since)
    )
    return [(tier, created) for tier, created in rows]


def window_score_times(session: Session, since: datetime) -> list[tuple[str, datetime, float]]:
    """(tier, request created, mean quality) of every scored image."""
    rows = session.execute(
        select(QualityScore.tier, GenerationRequest.created_at, QualityScore.mean_score)
        .join(GenerationRequest, GenerationRequest.id == QualityScore.request_id)
        .where(GenerationRequest.created_at >= since)
    )
    return [(tier, created, score) for tier, created, score in rows]


def count_requests(session: Session) -> int:
    """Every request ever made."""
    return int(session.scalar(select(func.count(GenerationRequest.id))) or 0)


def generations_by_tier(session: Session) -> dict[str, int]:
    """The images made on each tier, ever (explorations included)."""
    rows = session.execute(select(Generation.tier, func.count()).group_by(Generation.tier))
    return {tier: n for tier, n in rows}


def count_explored_decisions(session: Session) -> int:
    """The routing decisions that explored at least one tier besides the answering one."""
    return sum(len(e) > 0 for e in session.scalars(select(RoutingDecision.explored)))


def count_router_versions(session: Session) -> int:
    """Every router version ever registered."""
    return int(session.scalar(select(func.count(RouterVersion.id))) or 0)


def count_router_events(session: Session, event: str) -> int:
    """The router events of one kind (``promoted``, ``refused``...), ever."""
    return int(
        session.scalar(select(func.count(RouterEventRow.id)).where(RouterEventRow.event == event))
        or 0
    )
