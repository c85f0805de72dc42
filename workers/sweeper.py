"""The sweeper: re-enqueue requests stuck in one state longer than a timeout. The stage
to resume is read from the rows a request already has, so a resend repeats only what is
missing; after ``max_attempts`` sweeps without progress the request fails with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import queries
from db.models import Status, Tier
from routing.metrics import METRICS_VERSION
from workers.celery_app import TASK_GENERATE_CLOUD, TASK_GENERATE_EDGE, TASK_ROUTE, TASK_SCORE
from workers.settings import Settings

GENERATE_TASK = {Tier.EDGE: TASK_GENERATE_EDGE, Tier.CLOUD: TASK_GENERATE_CLOUD}


@dataclass(frozen=True)
class Resend:
    task: str
    args: tuple[str, ...]


def missing_work(session: Session, request_id: str) -> list[Resend]:
    """The tasks that would move this request on from where it stands."""
    request = queries.get_request(session, request_id)
    if request is None or request.status in (Status.DONE, Status.FAILED):
        return []
    decision = queries.get_decision(session, request_id)
    if decision is None:
        return [Resend(TASK_ROUTE, (request_id,))]
    scored = queries.scored_tiers(session, request_id, METRICS_VERSION)
    resends = []
    for tier in queries.required_tiers(decision):
        if queries.get_generation(session, request_id, tier) is None:
            resends.append(Resend(GENERATE_TASK[tier], (request_id,)))
        elif tier not in scored:
            resends.append(Resend(TASK_SCORE, (request_id, tier.value)))
    return resends


def sweep_stuck(session: Session, settings: Settings) -> list[Resend]:
    now = session.scalar(select(func.now()))  # the database's clock, not ours
    assert isinstance(now, datetime)
    stuck = queries.stuck_requests(
        session, timedelta(seconds=settings.stuck_after_seconds), now=now
    )
    resends: list[Resend] = []
    for request_id in stuck:
        attempts = queries.count_attempt(session, request_id)
        if attempts > settings.max_attempts:
            queries.fail(
                session,
                request_id,
                f"stuck: no progress after {attempts - 1} attempts "
                f"(timeout {settings.stuck_after_seconds}s)",
            )
            continue
        resends.extend(missing_work(session, request_id))
    return resends
