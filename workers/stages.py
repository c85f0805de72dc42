"""The work of each stage as plain functions over a session: the Celery tasks only parse,
call these, commit and hand on. Every write is idempotent, so a redelivered task that
finds its row does nothing twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from sqlalchemy.orm import Session

from db import queries
from db.models import (
    Generation,
    GenerationRequest,
    QualityScore,
    RoutingDecision,
    Status,
    Tier,
    TrainingPair,
)
from routing.metrics import METRIC_NAMES
from routing.quality import ContrastiveQualityScorer
from workers.budget import BudgetKeeper
from workers.images import ImageStore
from workers.runtime import RouterService

log = logging.getLogger(__name__)


class RequestGone(LookupError):
    """The request does not exist or is already final: the message has nothing to do."""


def live_request(session: Session, request_id: str) -> GenerationRequest:
    request = queries.get_request(session, request_id)
    if request is None or request.status in (Status.DONE, Status.FAILED):
        raise RequestGone(request_id)
    return request


@dataclass(frozen=True)
class Routed:
    tiers: tuple[Tier, ...]
    decision_id: int


def route_request(
    session: Session, request_id: str, router: RouterService, budget: BudgetKeeper
) -> Routed:
    """Predict PRS, ask the budget keeper, record one decision. A redelivery returns the
    decision already recorded (and the budget keeper spends at most once per request)."""
    request = live_request(session, request_id)
    decision = queries.get_decision(session, request_id)
    if decision is None:
        router.refresh(session)
        prediction = router.predict(request.prompt)
        alpha = router.alpha(session)
        wants_cloud = prediction.prs < alpha
        granted = budget.decide(request_id, wants_cloud=wants_cloud)
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
                "tier": Tier.CLOUD if granted.cloud else Tier.EDGE,
                "explore": granted.explore,
                "budget_reason": granted.reason,
            },
        )
        queries.record_progress(session, request_id)
        decision = queries.get_decision(session, request_id)
        assert decision is not None
    queries.transition(session, request_id, from_status=Status.QUEUED, to_status=Status.ROUTED)
    return Routed(tiers=queries.required_tiers(decision), decision_id=decision.id)


def generate_image(
    session: Session,
    request_id: str,
    tier: Tier,
    *,
    model_name: str,
    render: Callable[[GenerationRequest], Image.Image],
    store: ImageStore,
    worker: str,
) -> Generation:
    """Render and store the image of one tier, once."""
    request = live_request(session, request_id)
    decision = queries.get_decision(session, request_id)
    if decision is None or tier not in queries.required_tiers(decision):
        raise RequestGone(f"{request_id} was not routed to {tier.value}")
    existing = queries.get_generation(session, request_id, tier)
    if existing is not None:
        return existing
    started = time.perf_counter()
    image = render(request)
    latency_ms = (time.perf_counter() - started) * 1000.0
    image_path = store.save(request_id, tier, image)
    queries.insert_ignore(
        session,
        Generation,
        {
            "request_id": request_id,
            "tier": tier,
            "model": model_name,
            "image_path": image_path,
            "latency_ms": latency_ms,
            "worker": worker,
        },
    )
    queries.record_progress(session, request_id)
    generation = queries.get_generation(session, request_id, tier)
    assert generation is not None
    return generation


def score_image(
    session: Session,
    request_id: str,
    tier: Tier,
    *,
    scorer: ContrastiveQualityScorer,
    store: ImageStore,
) -> bool:
    """Score one tier's image on the ten metrics; finish the request when every tier it
    needs is scored, and keep an exploration sample's pair for training. True when done."""
    live_request(session, request_id)
    decision = queries.get_decision(session, request_id)
    generation = queries.get_generation(session, request_id, tier)
    if decision is None or generation is None:
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
        queries.record_progress(session, request_id)
    scored = queries.scored_tiers(session, request_id, version)
    needed = queries.required_tiers(decision)
    if not all(t in scored for t in needed):
        return False
    if decision.explore:
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
    return queries.transition(session, request_id, from_status=Status.ROUTED, to_status=Status.DONE)
