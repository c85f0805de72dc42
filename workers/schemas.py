"""The HTTP API's wire models: what it accepts and answers, and what the Python client
(``workers.entrypoints.client``) reads back, as vLLM's ``entrypoints/openai/protocol.py``
serves its server and clients alike. The API's OpenAPI schema is these models.

Pure pydantic: nothing here reads a database (``workers.services.views`` builds a
``RequestView`` from the rows), so that the client needs none of the server's stack. Fields
the API adds later are ignored, not refused, so that an older client keeps working against a
newer server."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FINAL_STATES",
    "Accepted",
    "BudgetView",
    "DecisionView",
    "FieldError",
    "GenerationView",
    "ProblemDetails",
    "QualityView",
    "Readiness",
    "RequestPage",
    "RequestSummary",
    "RequestView",
    "Status",
    "StepView",
]


# The wire's twin of db.models.Status, docstring included (the OpenAPI schema shows it);
# tests/unit/test_schemas.py holds the two to the same values.
class Status(enum.StrEnum):
    """queued: waiting for the router. routed: a tier was chosen, images and scores pending.
    done, failed and cancelled are final; failed carries a reason. cancelled: its caller
    withdrew it before any generation started (``db.queries.cancel``)."""

    QUEUED = "queued"
    ROUTED = "routed"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The states a request never leaves.
FINAL_STATES = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# --- problems (RFC 9457) -----------------------------------------------------------------------


class FieldError(_Wire):
    field: str
    detail: str


class ProblemDetails(_Wire):
    """RFC 9457 problem details; ``errors`` names each offending field."""

    type: str = Field(examples=["urn:t2iroute:problem:invalid-request"])
    title: str
    status: int
    detail: str
    errors: list[FieldError]


# --- requests ----------------------------------------------------------------------------------


class Accepted(_Wire):
    id: str
    created: bool = Field(description="False when an earlier request had this idempotency key")
    enqueued: bool = Field(description="False when the broker was down: the sweeper sends it")


# --- one request -------------------------------------------------------------------------------


class StepView(_Wire):
    """One step (``route``, ``generate:TIER``, ``score:TIER``) and its timings."""

    step: str
    status: str
    sends: int
    starts: int
    failures: int
    last_error: str | None
    dispatched_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    #: From the (last) send to the (last) start, and from that start to the end.
    waited_ms: float | None = Field(description="Milliseconds from its last send to its start")
    ran_ms: float | None = Field(description="Milliseconds from its last start to its end")


class DecisionView(_Wire):
    """What the router decided, and what the budget keeper granted."""

    tier: str = Field(description="The tier whose image answers")
    wanted_tier: str = Field(description="The tier the policy ranked first")
    explored: list[str] = Field(description="Tiers generated beside the answer, for labels")
    predicted_quality: dict[str, float] = Field(description="The router's score of each tier")
    predicted_metrics: list[float] | None
    tradeoff: float = Field(description="The policy's lambda: quality - lambda * cost")
    spent: float = Field(description="Cost units drawn from the budget")
    budget_reason: str = Field(description="What the budget keeper said")
    router_version: str
    rerouted_from: str | None
    reroute_reason: str | None
    escalations: list[dict[str, Any]]
    decided_at: datetime


class QualityView(_Wire):
    """An image's contrastive quality, metric by metric."""

    metrics_version: str
    mean: float
    scores: dict[str, float]


class GenerationView(_Wire):
    """One image: its tier and model, how long it took, where it is, how good it is."""

    tier: str
    model: str
    latency_ms: float
    worker: str | None
    created_at: datetime
    image_path: str = Field(description="Its path inside the image store")
    image_url: str = Field(description="Where the HTTP API serves it")
    quality: list[QualityView]


class RequestView(_Wire):
    """Where a request stands."""

    id: str
    status: Status
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    prompt: str
    width: int
    height: int
    steps: int | None
    seed: int
    guidance_scale: float | None
    idempotency_key: str | None
    callback_url: str | None
    metadata: dict[str, Any] | None
    decision: DecisionView | None
    answer_tier: str | None = Field(
        description="The tier whose image answers, once the request is done"
    )
    stages: list[StepView]
    generations: list[GenerationView]

    @property
    def final(self) -> bool:
        """True once the request is done, failed or cancelled."""
        return self.status in FINAL_STATES


class RequestSummary(_Wire):
    """A request in a listing; its URL has the whole view."""

    id: str
    status: Status
    tier: str | None = Field(description="The tier routed to, once routed")
    created_at: datetime
    updated_at: datetime
    idempotency_key: str | None
    failure_reason: str | None
    metadata: dict[str, Any] | None
    url: str


class RequestPage(_Wire):
    items: list[RequestSummary] = Field(description="Newest first")
    next: str | None = Field(description="The cursor of the next page; null on the last")


# --- the budget, readiness ---------------------------------------------------------------------


class BudgetView(_Wire):
    """The budget keeper's buckets now, and what the budget paid for lately."""

    backend: str
    budget_per_request: float = Field(description="Cost units each request adds (B)")
    burst: float = Field(description="The spend bucket's capacity (C)")
    extra_cost: dict[str, float] = Field(description="What each tier takes from the budget")
    buckets: dict[str, float] | None = Field(
        description="Tokens per bucket and the keeper's counters (BudgetKeeper.stats)"
    )
    buckets_error: str | None = Field(description="Why the buckets could not be read")
    window_minutes: int
    since: datetime
    decisions: int = Field(description="Routing decisions in the window")
    spent: float = Field(description="Cost units they drew")
    allowed: float = Field(description="What the budget allowed them: B * decisions + C")
    answers: dict[str, int] = Field(description="Requests each tier answered in the window")
    generations: dict[str, int] = Field(description="Images made on each tier, explorations in")
    tradeoff: float | None = Field(description="The policy's lambda in the latest decision")


class Readiness(_Wire):
    status: str
    checks: dict[str, str]
