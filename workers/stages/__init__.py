"""The work of each step as plain functions over a session: the Celery tasks only parse,
call these, commit and hand on. Every write is idempotent, so a redelivered task that
finds its row does nothing twice. Each function returns the steps it newly made necessary;
the caller sends them after its transaction commits (``workers.app.flow``)."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import event
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
from workers.app import flow
from workers.app.flow import Step
from workers.pool import Pool
from workers.services import telemetry
from workers.services.budget import BudgetKeeper
from workers.services.images import ImageStore
from workers.services.runtime import RouterService, break_ties

log = logging.getLogger(__name__)


class RequestGone(LookupError):
    """The request does not exist, has failed or was cancelled, or no longer needs this
    step: the message has nothing to do."""


#: A request in these states has nothing more to do.
GONE = (Status.FAILED, Status.CANCELLED)


def _request(session: Session, request_id: str) -> GenerationRequest:
    request = queries.get_request(session, request_id)
    if request is None or request.status in GONE:
        raise RequestGone(request_id)
    return request


#: A request's (or a request's tier's) outcome in a batch: the steps it now needs, or why it
#: has nothing to do.
Outcome = list[Step] | RequestGone
#: A (request id, tier) pair: what a generation or a score works on.
Key = tuple[str, str]

T = TypeVar("T")


def _or_raise(outcome: T | RequestGone) -> T:
    """One request's outcome of a batched stage, its being gone raised."""
    if isinstance(outcome, RequestGone):
        raise outcome
    return outcome


def _live(
    requests: Mapping[str, GenerationRequest], request_ids: Sequence[str]
) -> tuple[list[str], dict[str, Outcome]]:
    """The ids whose request exists and has neither failed nor been cancelled, and the gone
    ones' outcomes."""
    gone: dict[str, Outcome] = {}
    live = []
    for rid in dict.fromkeys(request_ids):
        request = requests.get(rid)
        if request is None or request.status in GONE:
            gone[rid] = RequestGone(rid)
        else:
            live.append(rid)
    return live, gone


def _hand_on_many(
    session: Session, handed: Mapping[tuple[str, Step], list[Step]]
) -> dict[tuple[str, Step], list[Step]]:
    """``_hand_on`` for a batch: one insert for every step that follows, one update per kind
    of step closed. Each entry gets back the steps it recorded first (to send)."""
    recorded = queries.record_steps_many(
        session, [(rid, step.key) for (rid, _), needed in handed.items() for step in needed]
    )
    closing: dict[str, list[str]] = {}
    for rid, done in handed:
        closing.setdefault(done.key, []).append(rid)
    for key, rids in closing.items():
        queries.finish_steps(session, rids, key)
    return {
        (rid, done): [step for step in needed if (rid, step.key) in recorded]
        for (rid, done), needed in handed.items()
    }


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
    """``route_requests`` for one request; raises ``RequestGone`` when it has nothing to do."""
    return _or_raise(route_requests(session, [request_id], router, budget, pool)[request_id])


def route_requests(
    session: Session,
    request_ids: Sequence[str],
    router: RouterService,
    budget: BudgetKeeper,
    pool: Pool,
) -> dict[str, Outcome]:
    """Predict every tier's quality for a batch of prompts in one forward pass, rank the
    tiers by the policy, let the budget keeper grant each request the best it can afford,
    record one decision per request and the generation steps it needs. A redelivery finds
    the decision (the budget keeper spends at most once per request) and records nothing
    new. A tier out of service (its breaker open) is not offered."""
    requests = queries.get_requests(session, request_ids)
    live, outcomes = _live(requests, request_ids)
    decisions = queries.get_decisions(session, live)
    new = [rid for rid in live if rid not in decisions]
    wanted: dict[str, tuple[str, ...]] = {
        rid: queries.wanted_tiers(d) for rid, d in decisions.items()
    }
    if new:
        router.refresh(session)
        predictions = [
            break_ties(p, rid, pool)
            for rid, p in zip(
                new, router.predict_many([requests[rid].prompt for rid in new]), strict=True
            )
        ]
        tradeoff = router.tradeoff(session)
        down = queries.unavailable_tiers(session)
        rankings = [rank_tiers(p.quality, pool, tradeoff) for p in predictions]
        offered = [[t for t in ranking if t not in down] or ranking for ranking in rankings]
        explore = router.explore(new, predictions)
        grants = budget.decide_many(
            [
                (rid, available, _exploration(rid, pool, available) if candidate else [])
                for rid, available, candidate in zip(new, offered, explore, strict=True)
            ]
        )
        rows = []
        for rid, prediction, ranking, available, granted in zip(
            new, predictions, rankings, offered, grants, strict=True
        ):
            first = ranking[0]
            explored = [t for t in granted.explored if t not in down]
            # A reroute is a tier granted in place of the first that was out of service; with
            # every tier out, the whole ranking is offered and nothing is rerouted.
            rerouted = first not in available and granted.tier != first
            rows.append(
                {
                    "request_id": rid,
                    "router_version": prediction.router_version,
                    "predicted_quality": prediction.quality,
                    "predicted_metrics": prediction.metrics,
                    "tradeoff": tradeoff,
                    "wanted_tier": first,
                    "tier": granted.tier,
                    "explored": explored,
                    "spent": granted.spent,
                    "budget_reason": granted.reason,
                    "rerouted_from": first if rerouted else None,
                    "reroute_reason": f"{first} out of service: {down[first][:200]}"
                    if rerouted
                    else None,
                }
            )
            wanted[rid] = queries.tiers_wanted(granted.tier, explored)
        telemetry.record_decisions(rows)
        if queries.insert_ignore_many(session, RoutingDecision, rows) < len(rows):
            # Another worker decided some of them first: theirs stand.
            for rid, decision in queries.get_decisions(session, new).items():
                wanted[rid] = queries.wanted_tiers(decision)
    moved = queries.transition_many(
        session, live, from_status=Status.QUEUED, to_status=Status.ROUTED
    )
    # A queued request that did not move was cancelled while it was routed (the cancel holds
    # its row; db.queries.cancel) or routed by another delivery, which hands it on: either
    # way nothing follows from here. Its decision stays, as the budget was drawn for it.
    routed = [rid for rid in live if rid in moved or requests[rid].status is Status.ROUTED]
    outcomes.update({rid: RequestGone(rid) for rid in live if rid not in routed})
    handed = _hand_on_many(
        session, {(rid, flow.ROUTE): [flow.generate(t) for t in wanted[rid]] for rid in routed}
    )
    outcomes.update({rid: handed[(rid, flow.ROUTE)] for rid in routed})
    return outcomes


def generation_job(session: Session, request_id: str, tier: str) -> GenerationRequest | None:
    """The request to render on ``tier``, or None when its image exists already."""
    return _or_raise(generation_jobs(session, [(request_id, tier)])[(request_id, tier)])


def generation_jobs(
    session: Session, keys: Sequence[Key]
) -> dict[Key, GenerationRequest | RequestGone | None]:
    """For each (request, tier): the request to render, None when its image exists already,
    or why there is nothing to do (the request is gone or was not routed to the tier)."""
    ids = list(dict.fromkeys(rid for rid, _ in keys))
    requests = queries.get_requests(session, ids)
    live, gone = _live(requests, ids)
    decisions = queries.get_decisions(session, live)
    made = queries.get_generations(session, live, [tier for _, tier in keys])
    jobs: dict[Key, GenerationRequest | RequestGone | None] = {}
    for rid, tier in keys:
        decision = decisions.get(rid)
        if rid in gone:
            jobs[(rid, tier)] = RequestGone(rid)
        elif decision is None or tier not in queries.wanted_tiers(decision):
            jobs[(rid, tier)] = RequestGone(f"{rid} was not routed to {tier}")
        else:
            jobs[(rid, tier)] = None if (rid, tier) in made else requests[rid]
    return jobs


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
    return complete_generations(session, {(request_id, tier): image})[(request_id, tier)]


def complete_generations(
    session: Session, images: Mapping[Key, NewImage | None]
) -> dict[Key, list[Step]]:
    """Record the rendered images (once each) and hand each tier on to scoring."""
    rows = [
        {
            "request_id": rid,
            "tier": tier,
            "model": image.model,
            "image_path": image.image_path,
            "latency_ms": image.latency_ms,
            "worker": image.worker,
        }
        for (rid, tier), image in images.items()
        if image is not None
    ]
    queries.insert_ignore_many(session, Generation, rows)
    telemetry.observe_generations(rows)
    for tier in sorted({tier for (_, tier), image in images.items() if image is not None}):
        queries.record_tier_success(session, tier)
    handed = _hand_on_many(
        session,
        {(rid, flow.generate(tier)): [flow.score(tier)] for rid, tier in images},
    )
    return {(rid, tier): handed[(rid, flow.generate(tier))] for rid, tier in images}


def score_image(
    session: Session,
    request_id: str,
    tier: str,
    *,
    scorer: ContrastiveQualityScorer,
    store: ImageStore,
    escalation: Escalation | None = None,
) -> list[Step]:
    """``score_images`` for one image; raises ``RequestGone`` when it has nothing to do."""
    outcomes = score_images(
        session, [(request_id, tier)], scorer=scorer, store=store, escalation=escalation
    )
    return _or_raise(outcomes[(request_id, tier)])


def score_images(
    session: Session,
    keys: Sequence[Key],
    *,
    scorer: ContrastiveQualityScorer,
    store: ImageStore,
    escalation: Escalation | None = None,
) -> dict[Key, Outcome]:
    """Score a batch of images on the ten metrics, in one CLIP call. A request is done when
    the tier of its answer is scored (and, under ``escalation``, good enough or escalated as
    far as allowed); an exploration sample's other tiers are labels, scored on the side."""
    keys = list(dict.fromkeys(keys))
    ids = list(dict.fromkeys(rid for rid, _ in keys))
    requests = queries.get_requests(session, ids)
    live, gone = _live(requests, ids)
    images = queries.get_generations(session, live, [tier for _, tier in keys])
    version = scorer.metrics_version
    scored = queries.scored_tiers_many(session, live, version)
    outcomes: dict[Key, Outcome] = {}
    for rid, tier in keys:
        if rid in gone:
            outcomes[(rid, tier)] = gone[rid]
        elif (rid, tier) not in images:
            outcomes[(rid, tier)] = RequestGone(f"{rid} has no {tier} image to score")
    todo = [k for k in keys if k not in outcomes]
    unscored = [(rid, tier) for rid, tier in todo if tier not in scored[rid]]
    if unscored:
        pictures = [store.open(images[key].image_path) for key in unscored]
        rows = []
        for (rid, tier), vector in zip(unscored, scorer.score(pictures), strict=True):
            values = [float(v) for v in vector]
            rows.append(
                {
                    "generation_id": images[(rid, tier)].id,
                    "request_id": rid,
                    "tier": tier,
                    "metrics_version": version,
                    "scores": {"names": list(METRIC_NAMES), "values": values},
                    "mean_score": sum(values) / len(values),
                }
            )
        queries.insert_ignore_many(session, QualityScore, rows)
        telemetry.observe_quality(rows)
        # Read back: a score another worker wrote first is the one that stands.
        scored = queries.scored_tiers_many(session, live, version)
    # Locked, so that a reroute (which moves the answer to another tier) and these scores
    # never both miss that the answer is now scored.
    decisions = queries.get_decisions(session, [rid for rid, _ in todo], for_update=True)
    finished: set[str] = set()
    handed: dict[tuple[str, Step], list[Step]] = {}
    for rid, tier in todo:
        decision = decisions.get(rid)
        if decision is None:
            outcomes[(rid, tier)] = RequestGone(f"{rid} has no decision")
            continue
        answering = (
            tier == decision.tier and requests[rid].status is Status.ROUTED and rid not in finished
        )
        done, needed = _settle(session, decision, scored[rid], answering, escalation)
        if done:
            finished.add(rid)
        handed[(rid, flow.score(tier))] = needed
    queries.transition_many(
        session, sorted(finished), from_status=Status.ROUTED, to_status=Status.DONE
    )
    for (rid, step), steps in _hand_on_many(session, handed).items():
        assert step.tier is not None
        outcomes[(rid, step.tier)] = steps
    return outcomes


def _settle(
    session: Session,
    decision: RoutingDecision,
    scored: Mapping[str, list[float]],
    answering: bool,
    escalation: Escalation | None,
) -> tuple[bool, list[Step]]:
    """What a new score means for its request: (done now, the steps it needs). Only the
    answer's own score, once, may escalate (not a label scored later)."""
    if decision.escalating_to is not None:
        if decision.escalating_to not in scored:
            return False, []
        _settle_escalation(decision, scored)
        return True, []
    if decision.tier not in scored:
        return False, []
    up = (
        escalation.next_tier(session, decision, scored)
        if escalation is not None and answering
        else None
    )
    if up is None:
        return True, []
    _escalate(decision, up, scored)
    if up in scored:
        # Explored already: the better of the two answers, at no further cost.
        _settle_escalation(decision, scored)
        return True, []
    return False, [flow.generate(up)]


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
            _escalation_charge(decision.request_id, made), preference=[dearer[0]]
        )
        return dearer[0] if granted.tier == dearer[0] else None


def _reroute_charge(request_id: str, step: Step) -> str:
    """The id the budget keeper charges a reroute away from ``step`` under."""
    return f"{request_id}/reroute/{step.key}"


def _escalation_charge(request_id: str, made: int) -> str:
    """The id the budget keeper charges a request's escalation number ``made`` under."""
    return f"{request_id}/escalate/{made}"


def charges(request_id: str, pool: Pool, decision: RoutingDecision | None) -> list[str]:
    """Every id the budget keeper may have charged a request under: its routing decision, a
    reroute away from each tier, each escalation it made."""
    made = len(decision.escalations) if decision is not None else 0
    return [
        request_id,
        *(_reroute_charge(request_id, flow.generate(tier)) for tier in pool.names),
        *(_escalation_charge(request_id, n) for n in range(made)),
    ]


def _fail(
    session: Session,
    request_id: str,
    reason: str,
    budget: BudgetKeeper,
    pool: Pool,
    decision: RoutingDecision | None,
) -> None:
    """Fail the request with the reason. No tier served it, so once the failure is committed
    the budget keeper gives back what it was charged (once per request; a rolled-back
    failure gives nothing)."""
    if not queries.fail(session, request_id, reason):
        return
    ids = charges(request_id, pool, decision)
    event.listen(session, "after_commit", lambda _: budget.refund(request_id, ids), once=True)


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
    else fails the request with the reason, and its budget is given back."""
    decision = queries.get_decision(session, request_id, for_update=True)
    if step.tier is None or decision is None:
        _fail(session, request_id, reason, budget, pool, decision)
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
        _fail(session, request_id, reason, budget, pool, decision)
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
        granted = budget.decide(_reroute_charge(request_id, step), preference=candidates)
        if granted.tier not in candidates:
            why = f"{reason}; no tier to replace it: {granted.reason}"
            _fail(session, request_id, why, budget, pool, decision)
            return []
        replacement = granted.tier
    else:
        why = f"{reason}; no other tier in service"
        _fail(session, request_id, why, budget, pool, decision)
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
