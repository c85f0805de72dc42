"""The score step: the ten quality metrics of a batch of images in one CLIP call; a request
is done when its answer is scored, or escalated to a dearer tier when the answer falls short
(``Escalation``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from db import queries
from db.models import QualityScore, RoutingDecision, Status, StepStatus
from routing.metrics import METRIC_NAMES
from routing.quality import ContrastiveQualityScorer
from workers.app import flow
from workers.app.flow import Step
from workers.pool import Pool
from workers.services import telemetry
from workers.services.budget import BudgetKeeper
from workers.services.images import ImageStore
from workers.stages.common import Key, Outcome, RequestGone, hand_on, live_requests
from workers.stages.give_up import escalation_charge

__all__ = ["Escalation", "score_images"]

log = logging.getLogger(__name__)


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
    live, gone = live_requests(requests, ids)
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
    for (rid, step), steps in hand_on(session, handed).items():
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
            escalation_charge(decision.request_id, made), preference=[dearer[0]]
        )
        return dearer[0] if granted.tier == dearer[0] else None
