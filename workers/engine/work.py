"""What each batched task does with the steps that started: a stage function in one
transaction (and, for a generation, the render between two, outside any transaction), its
outcomes keyed by step for the runner (``workers.engine.runner``) to hand on."""

from __future__ import annotations

from db.models import GenerationRequest
from db.session import session_scope
from workers import stages
from workers.app import flow
from workers.engine.runner import StepKey
from workers.services import telemetry
from workers.services.runtime import budget_keeper, image_store, quality_scorer, router_service
from workers.settings import Settings

__all__ = ["escalation", "generate", "route", "score"]


def escalation(settings: Settings) -> stages.Escalation | None:
    """The escalation policy of the settings, or None when they escalate nothing."""
    if settings.escalation_threshold is None or settings.max_escalations == 0:
        return None
    return stages.Escalation(
        settings.escalation_threshold,
        settings.max_escalations,
        budget_keeper(settings),
        settings.pool,
    )


def _tier_key(key: StepKey) -> stages.Key:
    request_id, step = key
    assert step.tier is not None
    return request_id, step.tier


def route(keys: list[StepKey], settings: Settings) -> dict[StepKey, stages.Outcome]:
    with telemetry.decision_timer(len(keys)), session_scope(settings.database_url) as session:
        outcomes = stages.route_requests(
            session,
            [rid for rid, _ in keys],
            router_service(settings),
            budget_keeper(settings),
            settings.pool,
        )
    return {(rid, flow.ROUTE): outcomes[rid] for rid, _ in keys}


def generate(keys: list[StepKey], settings: Settings, worker: str) -> dict[StepKey, stages.Outcome]:
    with session_scope(settings.database_url) as session:
        jobs = stages.generation_jobs(session, [_tier_key(key) for key in keys])
    outcomes: dict[StepKey, stages.Outcome] = {}
    renders: dict[stages.Key, GenerationRequest] = {}
    for key in keys:
        job = jobs[_tier_key(key)]
        if isinstance(job, stages.RequestGone):
            outcomes[key] = job
        elif job is not None:
            renders[_tier_key(key)] = job
    # Rendered outside any transaction: a GPU call holds no database connection.
    images = stages.render(renders, settings, image_store(settings), worker)
    made = {_tier_key(key): images.get(_tier_key(key)) for key in keys if key not in outcomes}
    if made:
        with session_scope(settings.database_url) as session:
            handed = stages.complete_generations(session, made)
        outcomes.update(
            {(rid, flow.generate(tier)): steps for (rid, tier), steps in handed.items()}
        )
    return outcomes


def score(keys: list[StepKey], settings: Settings) -> dict[StepKey, stages.Outcome]:
    with session_scope(settings.database_url) as session:
        outcomes = stages.score_images(
            session,
            [_tier_key(key) for key in keys],
            scorer=quality_scorer(settings),
            store=image_store(settings),
            escalation=escalation(settings),
        )
    return {(rid, flow.score(tier)): outcome for (rid, tier), outcome in outcomes.items()}
