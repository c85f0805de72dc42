"""Giving up a step: a step that failed ``max_attempts`` times (or whose message was lost
too often) drops an exploration tier, reroutes the answer to another tier, or fails the
request and gives its budget back; and the ids the budget keeper charges a request under."""

from __future__ import annotations

import logging

from sqlalchemy import event
from sqlalchemy.orm import Session

from db import queries
from db.models import RoutingDecision, Status, StepStatus
from routing.metrics import METRICS_VERSION
from routing.policy import rank_tiers
from workers.app import flow
from workers.app.flow import Step
from workers.pool import Pool
from workers.services.budget import BudgetKeeper

__all__ = ["charges", "escalation_charge", "give_up"]

log = logging.getLogger(__name__)


def _reroute_charge(request_id: str, step: Step) -> str:
    """The id the budget keeper charges a reroute away from ``step`` under."""
    return f"{request_id}/reroute/{step.key}"


def escalation_charge(request_id: str, made: int) -> str:
    """The id the budget keeper charges a request's escalation number ``made`` under."""
    return f"{request_id}/escalate/{made}"


def charges(request_id: str, pool: Pool, decision: RoutingDecision | None) -> list[str]:
    """Every id the budget keeper may have charged a request under: its routing decision, a
    reroute away from each tier, each escalation it made."""
    made = len(decision.escalations) if decision is not None else 0
    return [
        request_id,
        *(_reroute_charge(request_id, flow.generate(tier)) for tier in pool.names),
        *(escalation_charge(request_id, n) for n in range(made)),
    ]


def _finish(session: Session, request_id: str) -> None:
    queries.transition(session, request_id, from_status=Status.ROUTED, to_status=Status.DONE)


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
        for tier in rank_tiers(decision.predicted_quality, pool.costs(), decision.tradeoff)
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
