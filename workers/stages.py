"""The work of each step as plain functions over a session: the Celery tasks only parse,
call these, commit and hand on. Every write is idempotent, so a redelivered task that
finds its row does nothing twice. Each function returns the steps it newly made necessary;
the caller sends them after its transaction commits (``workers.flow``)."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping, Sequence
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
)
from routing.metrics import METRIC_NAMES, METRICS_VERSION
from routing.quality import ContrastiveQualityScorer
from workers import flow
from workers.budget import BudgetKeeper
from workers.flow import Step
from workers.images import ImageStore
from workers.pool import Pool
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


def _hand_on(session: Session, request_id: str, done: Step, needed: list[Step]) -> list[Step]:
    """Close ``done`` and record what follows it, in the caller's transaction."""
    recorded = set(queries.record_steps(session, request_id, [s.key for s in needed]))
    queries.finish_step(session, request_id, done.key)
    return [step for step in needed if step.key in recorded]


def rank_tiers(quality: Mapping[str, float], pool: Pool, tradeoff: float) -> list[str]:
    """The pool's tiers, best first by predicted quality minus ``tradeoff`` times cost (the
    policy's rule, routing/policy.py); ties and an infinite tradeoff go to the cheaper."""
    if math.isinf(tradeoff):
        return list(pool.names)
    return sorted(
        pool.names,
        key=lambda t: (-(quality.get(t, -math.inf) - tradeoff * pool[t].cost), pool[t].cost),
    )


def _exploration(request_id: str, pool: Pool, available: Sequence[str]) -> list[str]:
    """The tiers an exploration sample is generated on beside its answer: the cheapest (the
    reference every tier's superiority is measured against) and one other, drawn per
    request; with two tiers, both. The budget keeper leaves out the answer's own."""
    others = [t for t in available if t != pool.cheapest.name]
    chosen = [pool.cheapest.name] if pool.cheapest.name in available else []
    if others:
        chosen.append(others[uuid.UUID(request_id).int % len(others)])
    return chosen


def route_request(
    session: Session,
    request_id: str,
    router: RouterService,
    budget: BudgetKeeper,
    pool: Pool,
) -> list[Step]:
    """Predict every tier's quality, rank the tiers by the policy, let the budget keeper
    grant the best it can afford, record one decision and the generation steps it needs. A
    redelivery finds the decision (the budget keeper spends at most once per request) and
    records nothing new. A tier out of service (its breaker open) is not offered."""
    request = _request(session, request_id)
    decision = queries.get_decision(session, request_id)
    if decision is None:
        router.refresh(session)
        prediction = router.predict(request.prompt)
        tradeoff = router.tradeoff(session)
        ranking = rank_tiers(prediction.quality, pool, tradeoff)
        down = queries.unavailable_tiers(session)
        available = [t for t in ranking if t not in down] or ranking
        granted = budget.decide(
            request_id,
            preference=available,
            explore=_exploration(request_id, pool, available),
        )
        wanted = ranking[0]
        queries.insert_ignore(
            session,
            RoutingDecision,
            {
                "request_id": request_id,
                "router_version": prediction.router_version,
                "predicted_quality": prediction.quality,
                "predicted_metrics": prediction.metrics,
                "tradeoff": tradeoff,
                "wanted_tier": wanted,
                "tier": granted.tier,
                "explored": [t for t in granted.explored if t not in down],
                "spent": granted.spent,
                "budget_reason": granted.reason,
                "rerouted_from": wanted if wanted in down else None,
                "reroute_reason": f"{wanted} out of service: {down[wanted][:200]}"
                if wanted in down
                else None,
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


def generation_job(session: Session, request_id: str, tier: str) -> GenerationRequest | None:
    """The request to render on ``tier``, or None when its image exists already."""
    request = _request(session, request_id)
    decision = queries.get_decision(session, request_id)
    if decision is None or tier not in queries.wanted_tiers(decision):
        raise RequestGone(f"{request_id} was not routed to {tier}")
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
    session: Session, request_id: str, tier: str, image: NewImage | None
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
        queries.record_tier_success(session, tier)
    return _hand_on(session, request_id, flow.generate(tier), [flow.score(tier)])


def score_image(
    session: Session,
    request_id: str,
    tier: str,
    *,
    scorer: ContrastiveQualityScorer,
    store: ImageStore,
    escalation: Escalation | None = None,
) -> list[Step]:
    """Score one tier's image on the ten metrics. The request is done when the tier of its
    answer is scored (and, under ``escalation``, good enough or escalated as far as allowed);
    an exploration sample's other tiers are labels, scored on the side."""
    request = _request(session, request_id)
    generation = queries.get_generation(session, request_id, tier)
    if generation is None:
        raise RequestGone(f"{request_id} has no {tier} image to score")
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
    needed: list[Step] = []
    if decision.escalating_to is not None:
        if decision.escalating_to in scored:
            _settle_escalation(decision, scored)
            _finish(session, request_id)
    elif decision.tier in scored:
        # Only the answer's own score, once, may escalate (not a label scored later).
        answering = tier == decision.tier and request.status is Status.ROUTED
        up = (
            escalation.next_tier(session, decision, scored)
            if escalation is not None and answering
            else None
        )
        if up is None:
            _finish(session, request_id)
        elif up in scored:
            # Explored already: the better of the two answers, at no further cost.
            _escalate(decision, up, scored)
            _settle_escalation(decision, scored)
            _finish(session, request_id)
        else:
            _escalate(decision, up, scored)
            needed = [flow.generate(up)]
    return _hand_on(session, request_id, flow.score(tier), needed)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _finish(session: Session, request_id: str) -> None:
    queries.transition(session, request_id, from_status=Status.ROUTED, to_status=Status.DONE)


def _escalate(decision: RoutingDecision, up: str, scored: Mapping[str, list[float]]) -> None:
    log.info("request %s escalated from %s to %s", decision.request_id, decision.tier, up)
    decision.escalating_to = up
    # A new list: SQLAlchemy does not see a JSON value changed in place.
    decision.escalations = [
        *decision.escalations,
        {"from": decision.tier, "to": up, "quality_from": _mean(scored[decision.tier])},
    ]


def _settle_escalation(decision: RoutingDecision, scored: Mapping[str, list[float]]) -> None:
    """The escalated image is scored: the better of the two is the answer."""
    up = decision.escalating_to
    assert up is not None
    *earlier, last = decision.escalations
    quality_to = _mean(scored[up])
    decision.escalations = [*earlier, {**last, "quality_to": quality_to}]
    if quality_to > last["quality_from"]:
        decision.tier = up
    decision.escalating_to = None


@dataclass(frozen=True)
class Escalation:
    """The escalation policy: an answer whose mean quality is below ``threshold`` is
    generated again on the next dearer tier of the pool in service, at most ``limit`` times
    per request, each paid from the budget (refused: the answer stands)."""

    threshold: float
    limit: int
    budget: BudgetKeeper
    pool: Pool

    def next_tier(
        self, session: Session, decision: RoutingDecision, scored: Mapping[str, list[float]]
    ) -> str | None:
        made = len(decision.escalations)
        if made >= self.limit or _mean(scored[decision.tier]) >= self.threshold:
            return None
        down = queries.unavailable_tiers(session)
        given_up = (StepStatus.FAILED, StepStatus.ABANDONED)
        cost = self.pool[decision.tier].cost
        dearer = [
            t.name
            for t in self.pool
            if t.cost > cost
            and t.name not in down
            and queries.step_status(session, decision.request_id, flow.generate(t.name).key)
            not in given_up
        ]
        if not dearer:
            return None
        if dearer[0] in scored:
            return dearer[0]
        granted = self.budget.decide(
            f"{decision.request_id}/escalate/{made}", preference=[dearer[0]]
        )
        return dearer[0] if granted.tier == dearer[0] else None


def give_up(
    session: Session,
    request_id: str,
    step: Step,
    reason: str,
    budget: BudgetKeeper,
    pool: Pool,
) -> list[Step]:
    """A step failed ``max_attempts`` times (or its message was lost too often). An
    exploration tier is dropped on the side. The answer's tier is replaced by the next tier
    of the decision's ranking that has not failed it and is in service: one already generated
    for exploration first (it costs nothing more), else the best the budget grants. Anything
    else fails the request with the reason."""
    decision = queries.get_decision(session, request_id, for_update=True)
    if step.tier is None or decision is None:
        queries.fail(session, request_id, reason)
        return []
    if step.tier == decision.escalating_to:
        # The escalated tier could not make its image: the answer already made stands.
        log.warning("escalation %s of %s dropped: %s", step.key, request_id, reason)
        queries.finish_step(session, request_id, step.key, StepStatus.ABANDONED)
        *earlier, last = decision.escalations
        decision.escalations = [*earlier, {**last, "failed": reason[:500]}]
        decision.escalating_to = None
        _finish(session, request_id)
        return []
    if step.tier != decision.tier:
        log.warning("exploration step %s of %s dropped: %s", step.key, request_id, reason)
        queries.finish_step(session, request_id, step.key, StepStatus.ABANDONED)
        return []
    if step.kind == "score":
        queries.fail(session, request_id, reason)
        return []
    queries.finish_step(session, request_id, step.key, StepStatus.FAILED)
    given_up = (StepStatus.FAILED, StepStatus.ABANDONED)
    down = queries.unavailable_tiers(session)
    candidates = [
        tier
        for tier in rank_tiers(decision.predicted_quality, pool, decision.tradeoff)
        if tier != step.tier
        and tier not in down
        and queries.step_status(session, request_id, flow.generate(tier).key) not in given_up
    ]
    made = [t for t in candidates if queries.get_generation(session, request_id, t) is not None]
    if made:
        replacement = made[0]
    elif candidates:
        granted = budget.decide(f"{request_id}/reroute/{step.key}", preference=candidates)
        if granted.tier not in candidates:
            queries.fail(session, request_id, f"{reason}; no tier to replace it: {granted.reason}")
            return []
        replacement = granted.tier
    else:
        queries.fail(session, request_id, f"{reason}; no other tier in service")
        return []
    log.warning("request %s rerouted from %s to %s: %s", request_id, step.tier, replacement, reason)
    decision.rerouted_from = step.tier
    decision.reroute_reason = reason[:4000]
    decision.tier = replacement
    if replacement in queries.scored_tiers(session, request_id, METRICS_VERSION):
        _finish(session, request_id)
        return []
    needed = flow.generate(replacement)
    if queries.step_status(session, request_id, needed.key) is StepStatus.DONE:
        needed = flow.score(replacement)
    recorded = queries.record_steps(session, request_id, [needed.key])
    return [needed] if recorded else []
