"""A request's rows as the wire's ``RequestView`` (``workers.schemas``): its state and
timestamps, each step's timings (from ``dispatches``), the routing decision, every image with
its per-metric quality, and what the caller attached. The HTTP API answers it and the
producer's ``describe`` returns it as plain JSON."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from db import queries
from db.models import Dispatch, GenerationRequest, QualityScore, RoutingDecision
from db.models import Status as StoredStatus
from workers.schemas import (
    DecisionView,
    GenerationView,
    QualityView,
    RequestView,
    Status,
    StepView,
)

__all__ = ["image_url", "request_view"]


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds() * 1000.0


def _step(row: Dispatch) -> StepView:
    return StepView(
        step=row.step,
        status=row.status.value,
        sends=row.sends,
        starts=row.starts,
        failures=row.failures,
        last_error=row.last_error,
        dispatched_at=row.dispatched_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        waited_ms=_ms(row.dispatched_at, row.started_at),
        ran_ms=_ms(row.started_at, row.finished_at),
    )


def _decision(row: RoutingDecision) -> DecisionView:
    return DecisionView(
        tier=row.tier,
        wanted_tier=row.wanted_tier,
        explored=list(row.explored),
        predicted_quality=dict(row.predicted_quality),
        predicted_metrics=row.predicted_metrics,
        tradeoff=row.tradeoff,
        spent=row.spent,
        budget_reason=row.budget_reason,
        router_version=row.router_version,
        rerouted_from=row.rerouted_from,
        reroute_reason=row.reroute_reason,
        escalations=list(row.escalations),
        decided_at=row.created_at,
    )


def _quality(row: QualityScore) -> QualityView:
    return QualityView(
        metrics_version=row.metrics_version,
        mean=row.mean_score,
        scores=dict(zip(row.scores["names"], row.scores["values"], strict=True)),
    )


def image_url(request_id: str, tier: str) -> str:
    return f"/v1/requests/{request_id}/image?tier={tier}"


def request_view(session: Session, request: GenerationRequest) -> RequestView:
    """The view of one request, read in the caller's session."""
    decision = queries.get_decision(session, request.id)
    scores: dict[int, list[QualityView]] = {}
    for score in queries.quality_scores_of(session, request.id):
        scores.setdefault(score.generation_id, []).append(_quality(score))
    return RequestView(
        id=request.id,
        status=Status(request.status),
        failure_reason=request.failure_reason,
        created_at=request.created_at,
        updated_at=request.updated_at,
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        steps=request.steps,
        seed=request.seed,
        guidance_scale=request.guidance_scale,
        idempotency_key=request.idempotency_key,
        callback_url=request.callback_url,
        metadata=request.client_metadata,
        decision=None if decision is None else _decision(decision),
        answer_tier=decision.tier
        if decision is not None and request.status is StoredStatus.DONE
        else None,
        stages=[_step(row) for row in queries.steps_of(session, request.id)],
        generations=[
            GenerationView(
                tier=g.tier,
                model=g.model,
                latency_ms=g.latency_ms,
                worker=g.worker,
                created_at=g.created_at,
                image_path=g.image_path,
                image_url=image_url(request.id, g.tier),
                quality=scores.get(g.id, []),
            )
            for g in queries.generations_of(session, request.id)
        ],
    )
