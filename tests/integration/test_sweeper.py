"""The sweeper on the real Postgres: what it resends, and when it gives up."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from db import queries
from db.models import Generation, GenerationRequest, RoutingDecision, Status, Tier
from db.session import session_scope
from workers.celery_app import TASK_GENERATE_CLOUD, TASK_GENERATE_EDGE, TASK_ROUTE, TASK_SCORE
from workers.settings import Settings
from workers.sweeper import Resend, sweep_stuck

pytestmark = pytest.mark.integration


def _request(url: str, *, age_seconds: int, status: Status = Status.QUEUED) -> str:
    request_id = str(uuid.uuid4())
    with session_scope(url) as session:
        session.add(
            GenerationRequest(
                id=request_id, prompt="a boat", width=64, height=64, steps=1, seed=0, status=status
            )
        )
    _age(url, request_id, age_seconds)
    return request_id


def _age(url: str, request_id: str, seconds: int) -> None:
    with session_scope(url) as session:
        session.execute(
            text(
                "UPDATE generation_requests SET updated_at = now() - make_interval(secs => :s)"
                " WHERE id = :id"
            ),
            {"s": seconds, "id": request_id},
        )


def _decide(url: str, request_id: str, *, explore: bool) -> None:
    with session_scope(url) as session:
        session.add(
            RoutingDecision(
                request_id=request_id,
                router_version="test",
                predicted_prs=0.4,
                alpha=0.5,
                wants_cloud=True,
                tier=Tier.CLOUD,
                explore=explore,
                budget_reason="test",
            )
        )


def test_fresh_requests_are_left_alone(clean_db: str, settings: Settings) -> None:
    _request(clean_db, age_seconds=1)
    with session_scope(clean_db) as session:
        assert sweep_stuck(session, settings) == []


def test_stuck_requests_resume_where_they_stand(clean_db: str, settings: Settings) -> None:
    old = settings.stuck_after_seconds + 60
    unrouted = _request(clean_db, age_seconds=old)
    explored = _request(clean_db, age_seconds=old, status=Status.ROUTED)
    _decide(clean_db, explored, explore=True)
    with session_scope(clean_db) as session:
        session.add(
            Generation(
                request_id=explored,
                tier=Tier.EDGE,
                model="tiny",
                image_path=f"{explored}/edge.png",
                latency_ms=1.0,
            )
        )
    with session_scope(clean_db) as session:
        resends = set(sweep_stuck(session, settings))
    assert resends == {
        Resend(TASK_ROUTE, (unrouted,)),
        Resend(TASK_SCORE, (explored, "edge")),
        Resend(TASK_GENERATE_CLOUD, (explored,)),
    }
    assert TASK_GENERATE_EDGE not in {r.task for r in resends}


def test_a_request_without_progress_fails_with_the_reason(
    clean_db: str, settings: Settings
) -> None:
    old = settings.stuck_after_seconds + 60
    request_id = _request(clean_db, age_seconds=old)
    for _ in range(settings.max_attempts):
        with session_scope(clean_db) as session:
            assert sweep_stuck(session, settings) == [Resend(TASK_ROUTE, (request_id,))]
        # A resend starts the timeout again; it expires once more without progress.
        with session_scope(clean_db) as session:
            assert sweep_stuck(session, settings) == []
        _age(clean_db, request_id, old)
    with session_scope(clean_db) as session:
        assert sweep_stuck(session, settings) == []
        request = queries.get_request(session, request_id)
        assert request is not None
        assert request.status is Status.FAILED
        assert request.failure_reason is not None
        assert "stuck" in request.failure_reason
