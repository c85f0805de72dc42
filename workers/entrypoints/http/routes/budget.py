"""``GET /v1/budget``: the budget keeper's buckets now, and what the budget paid for lately."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from redis.exceptions import RedisError

from db import queries
from workers.entrypoints.http.deps import CallerDep, SessionDep, SettingsDep
from workers.entrypoints.http.problems import first_line, problem_responses
from workers.schemas import BudgetView
from workers.services.budget import BudgetKeeper, BudgetLimits
from workers.settings import Settings

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter()

#: One keeper per budget Redis, kept for the process (its connection pool with it).
_keepers: dict[str, BudgetKeeper] = {}


def _buckets(settings: Settings) -> tuple[dict[str, float] | None, str | None]:
    if settings.budget_backend != "redis":
        return None, "the budget backend is local: its buckets live in the router's process"
    if settings.redis_url not in _keepers:
        _keepers[settings.redis_url] = BudgetKeeper.from_settings(settings)
    try:
        return _keepers[settings.redis_url].stats(), None
    except RedisError as exc:
        log.warning("GET /v1/budget: the budget Redis is unreachable (%s)", first_line(exc))
        return None, f"the budget Redis is unreachable ({type(exc).__name__})"


@router.get("/v1/budget", response_model=BudgetView, responses=problem_responses(401, 422, 503))
def read_budget(
    who: CallerDep,
    settings: SettingsDep,
    session: SessionDep,
    window_minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
) -> BudgetView:
    """Tokens per bucket, the spend of the last minutes against the budget, per-tier counts."""
    limits = BudgetLimits.from_settings(settings)
    buckets, error = _buckets(settings)
    since = queries.database_now(session) - timedelta(minutes=window_minutes)
    spend = queries.spend_since(session, since)
    tradeoff = queries.latest_tradeoff(session)
    tiers = settings.pool.names
    return BudgetView(
        backend=settings.budget_backend,
        budget_per_request=limits.budget_per_request,
        burst=limits.burst,
        extra_cost={tier: limits.extra_cost(tier) for tier in tiers},
        buckets=buckets,
        buckets_error=error,
        window_minutes=window_minutes,
        since=since,
        decisions=spend.decisions,
        spent=spend.spent,
        allowed=limits.budget_per_request * spend.decisions + limits.burst,
        answers={tier: spend.answers.get(tier, 0) for tier in tiers},
        generations={tier: spend.generations.get(tier, 0) for tier in tiers},
        tradeoff=tradeoff,
    )
