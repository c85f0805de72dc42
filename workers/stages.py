"""The work of each step as plain functions over a session: the Celery tasks only parse,
call these, commit and hand on. Every write is idempotent, so a redelivered task that
finds its row does nothing twice. Each function returns the steps it newly made necessary;
the caller sends them after its transaction commits (``workers.flow``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from db import queries
from db.models import (
    Generation,
    GenerationRequest,
    QualityScore,
    RoutingDecision,
    Status,
    StepStatus,
    Tier,
    TrainingPair,
)
from routing.metrics import METRIC_NAMES, METRICS_VERSION
from routing.quality import ContrastiveQualityScorer
from workers import flow
from workers.budget import BudgetKeeper
from workers.flow import Step
from workers.images import ImageStore
from workers.runtime import RouterService

log = logging.getLogger(__name__)


class RequestGone(LookupError):
    """The request does not exist, has failed, or no longer needs this step: the message
    has nothing to do."""


def _request(session: Session, request_id: str) -> GenerationRequest:
    request = queries.get_request(session, request_id)
    if request is None or request.status is Status.FAILED:
        raise RequestGone(request_id)
    return request


def _other(tier: Tier) -> Tier:
    return Tier.CLOUD if tier is Tier.EDGE else Tier.EDGE


def _hand_on(session: Session, request_id: str, done: Step, needed: list[Step]) -> list[Step]:
    """Close ``done`` and record what follows it, in the caller's transaction."""
    recorded = set(queries.record_steps(session, request_id, [s.key for s in needed]))
    queries.finish_step(session, request_id, done.key)
    return [step for step in needed if step.key in recorded]


@dataclass(frozen=True)
class _Reroute:
    tier: Tier
    reason: str


def _route_around(
    request_id: str, tier: Tier, down: dict[str, str], budget: BudgetKeeper
) -> _Reroute | None:
    """The tier to use instead of ``tier`` when its breaker is open: a cheaper tier always,
    a dearer one only if the budget grants it (the budget keeper is the hard guarantee)."""
    if tier.value not in down:
        return None
    other = _other(tier)
    if other.value in down:
        return None
    why = f"{tier.value} out of service: {down[tier.value][:200]}"
    if other is Tier.CLOUD:
        granted = budget.decide(f"{request_id}/reroute", preference=[Tier.CLOUD])
        if granted.tier != Tier.CLOUD:
            return None
    return _Reroute(other, why)


def route_request(
    session: Session, request_id: str, router: RouterService, budget: BudgetKeeper
) -> list[Step]:
    """Predict PRS, ask the budget keeper, record one decision, and record the generation
    steps it needs. A redelivery finds the decision (and the budget keeper spends at most
    once per request) and records nothing new."""
    request = _request(session, request_id)
    decision = queries.get_decision(session, request_id)
    if decision is None:
        router.refresh(session)
        prediction = router.predict(request.prompt)
        alpha = router.alpha(session)
        wants_cloud = prediction.prs < alpha
        down = queries.unavailable_tiers(session)
        # A tier out of service is not asked of the budget keeper at all.
        wanted = Tier.CLOUD if wants_cloud else Tier.EDGE
        asks_cloud = wants_cloud and "cloud" not in down
        granted = budget.decide(
            request_id,
            preference=[Tier.CLOUD, Tier.EDGE] if asks_cloud else [Tier.EDGE],
            explore=list(Tier),
        )
        tier = Tier(granted.tier)
        reroute = _route_around(request_id, wanted if wanted.value in down else tier, down, budget)
        if reroute is not None:
            tier = reroute.tier
        queries.insert_ignore(
            session,
            RoutingDecision,
            {
                "request_id": request_id,
                "router_version": prediction.router_version,
                "predicted_prs": prediction.prs,
                "predicted_metrics": prediction.metrics,
                "alpha": alpha,
                "wants_cloud": wants_cloud,
                "tier": tier,
                # No labelled pair can come from a tier out of service.
                "explore": bool(granted.explored) and _other(tier).value not in down,
                "budget_reason": granted.reason,
                "rerouted_from": None if reroute is None else _other(reroute.tier),
                "reroute_reason": None if reroute is None else reroute.reason,
            },
        )
        decision = queries.get_decision(session, request_id)
        assert decision is not None
    queries.transition(session, request_id, from_status=Status.QUEUED, to_status=Status.ROUTED)
    return _hand_on(
        session,
        request_id,
        flow.ROUTE,
        [flow.generate(t) for t in queries.wanted_tiers(decision)],
    )


def generation_job(session: Session, request_id: str, tier: Tier) -> GenerationRequest | None:
    """The request to render on ``tier``, or None when its image exists already."""
    request = _request(session, request_id)
    decision = queries.get_decision(session, request_id)
    if decision is None or tier not in queries.wanted_tiers(decision):
        raise RequestGone(f"{request_id} was not routed to {tier.value}")
    if queries.get_generation(session, request_id, tier) is not None:
        return None
    return request


@dataclass(frozen=True)
class NewImage:
    model: str
    image_path: str
    latency_ms: float
    worker: str


def complete_generation(
    session: Session, request_id: str, tier: Tier, image: NewImage | None
) -> list[Step]:
    """Record a rendered image (once) and hand the tier on to scoring."""
    if image is not None:
        queries.insert_ignore(
            session,
            Generation,
            {
                "request_id": request_id,
                "tier": tier,
                "model": image.model,
                "image_path": image.image_path,
                "latency_ms": image.latency_ms,
                "worker": image.worker,
            },
        )
        queries.record_tier_success(session, tier.value)
    return _hand_on(session, request_id, flow.generate(tier), [flow.score(tier)])


def score_image(
    session: Session,
    request_id: str,
    tier: Tier,
    *,
    scorer: ContrastiveQualityScorer,
    store: ImageStore,
) -> list[Step]:
    """Score one tier's image on the ten metrics. The request is done when the tier of its
    answer is scored; when both tiers of an exploration sample are, it becomes a pair."""
    _request(session, request_id)
    generation = queries.get_generation(session, request_id, tier)
    if generation is None:
        raise RequestGone(f"{request_id} has no {tier.value} image to score")
    version = scorer.metrics_version
    if tier not in queries.scored_tiers(session, request_id, version):
        values = [float(v) for v in scorer.score([store.open(generation.image_path)])[0]]
        queries.insert_ignore(
            session,
            QualityScore,
            {
                "generation_id": generation.id,
                "request_id": request_id,
                "tier": tier,
                "metrics_version": version,
                "scores": {"names": list(METRIC_NAMES), "values": values},
                "mean_score": sum(values) / len(values),
            },
        )
    # Locked, so that a reroute (which moves the answer to another tier) and this score
    # never both miss that the answer is now scored.
    decision = queries.get_decision(session, request_id, for_update=True)
    if decision is None:
        raise RequestGone(f"{request_id} has no decision")
    scored = queries.scored_tiers(session, request_id, version)
    if decision.tier in scored:
        queries.transition(session, request_id, from_status=Status.ROUTED, to_status=Status.DONE)
    if decision.explore and Tier.EDGE in scored and Tier.CLOUD in scored:
        queries.insert_ignore(
            session,
            TrainingPair,
            {
                "request_id": request_id,
                "metrics_version": version,
                "edge_scores": scored[Tier.EDGE],
                "cloud_scores": scored[Tier.CLOUD],
            },
        )
    return _hand_on(session, request_id, flow.score(tier), [])


def give_up(
    session: Session, request_id: str, step: Step, reason: str, budget: BudgetKeeper
) -> list[Step]:
    """A step failed ``max_attempts`` times (or its message was lost too often). An
    exploration tier is dropped on the side; the answer's tier is replaced by a tier that
    works when the budget allows; anything else fails the request with the reason."""
    decision = queries.get_decision(session, request_id, for_update=True)
    if step.tier is None or decision is None:
        queries.fail(session, request_id, reason)
        return []
    if step.tier is not decision.tier:
        log.warning("exploration step %s of %s dropped: %s", step.key, request_id, reason)
        queries.finish_step(session, request_id, step.key, StepStatus.ABANDONED)
        return []
    other = _other(step.tier)
    failed_there = queries.step_status(session, request_id, flow.generate(other).key) in (
        StepStatus.FAILED,
        StepStatus.ABANDONED,
    )
    if step.kind == "score" or decision.rerouted_from is other or failed_there:
        queries.fail(session, request_id, reason)
        return []
    already_made = queries.get_generation(session, request_id, other) is not None
    if other is Tier.CLOUD and not already_made:
        granted = budget.decide(f"{request_id}/reroute", preference=[Tier.CLOUD])
        if granted.tier != Tier.CLOUD:
            queries.fail(session, request_id, f"{reason}; no cloud fallback: {granted.reason}")
            return []
    log.warning("request %s rerouted from %s to %s: %s", request_id, step.tier, other, reason)
    decision.rerouted_from = step.tier
    decision.reroute_reason = reason[:4000]
    decision.tier = other
    queries.finish_step(session, request_id, step.key, StepStatus.FAILED)
    if other in queries.scored_tiers(session, request_id, METRICS_VERSION):
        queries.transition(session, request_id, from_status=Status.ROUTED, to_status=Status.DONE)
        return []
    needed = flow.generate(other)
    if queries.step_status(session, request_id, needed.key) is StepStatus.DONE:
        needed = flow.score(other)
    recorded = queries.record_steps(session, request_id, [needed.key])
    return [needed] if recorded else []
