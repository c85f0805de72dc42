"""SQLAlchemy 2 typed models. Unique constraints make every task idempotent: a redelivered
task finds its row and does nothing twice."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy API)
        dict[str, Any]: JSON,
        dict[str, float]: JSON,
        list[float]: JSON,
        list[str]: JSON,
        list[dict[str, Any]]: JSON,
    }


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
FINAL_STATUSES = (Status.DONE, Status.FAILED, Status.CANCELLED)


# A tier is a name from the pool (workers/pool.py), not an enum: pools are configuration.
TIER_NAME_LENGTH = 32


def _tier_column(*, nullable: bool = False) -> Mapped[Any]:
    return mapped_column(String(TIER_NAME_LENGTH), nullable=nullable)


def _string_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    """Stored as plain strings (portable to the demo's SQLite), values not member names."""
    return Enum(
        cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]
    )


def _new_id() -> str:
    return str(uuid.uuid4())


def _utc_now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class GenerationRequest(Base):
    __tablename__ = "generation_requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_new_id)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    # None where the caller stated none: the tier's own default then applies (the same model
    # at another step count is another tier).
    steps: Mapped[int | None] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    guidance_scale: Mapped[float | None] = mapped_column(Float)
    status: Mapped[Status] = mapped_column(
        _string_enum(Status, "request_status"),
        nullable=False,
        default=Status.QUEUED,
    )
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _utc_now_column()
    updated_at: Mapped[datetime] = _utc_now_column()
    # The caller's: where to POST the outcome, what to be handed back with it, and the API
    # key that made it (None: made in-process, or over HTTP with auth off).
    callback_url: Mapped[str | None] = mapped_column(Text)
    client_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    # No index on status: nothing selects requests by status alone, and with one a fresh
    # table's planner took it for transition()'s ``id = ... AND status IN (...)``, reading
    # every request in that status; without it a transition is also a HOT update.

    __table_args__ = (
        # An idempotency key is its caller's: two API keys may use the same one without
        # meeting. A unique constraint holds NULLs distinct, so the requests made without an
        # API key (one namespace) have a partial index of their own.
        UniqueConstraint("api_key_id", "idempotency_key", name="uq_generation_requests_owner_key"),
        Index(
            "uq_generation_requests_keyless_key",
            "idempotency_key",
            unique=True,
            postgresql_where=text("api_key_id IS NULL"),
            sqlite_where=text("api_key_id IS NULL"),
        ),
        # The listing's order, newest first and by id within one instant (its cursor): all
        # requests, and one API key's.
        Index("ix_generation_requests_created_at_id", "created_at", "id"),
        Index("ix_generation_requests_api_key_created_at", "api_key_id", "created_at", "id"),
    )


class RoutingDecision(Base):
    __tablename__ = "routing_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("generation_requests.id", ondelete="CASCADE"), unique=True, nullable=False
    )
    router_version: Mapped[str] = mapped_column(String(200), nullable=False)
    # The router's score of every tier (higher is better), and RouteT2I's per-metric D_i.
    predicted_quality: Mapped[dict[str, float]] = mapped_column(nullable=False)
    predicted_metrics: Mapped[list[float] | None] = mapped_column(JSON)
    # The policy's lambda: it chose argmax(predicted quality - lambda * cost).
    tradeoff: Mapped[float] = mapped_column(Float, nullable=False)
    wanted_tier: Mapped[str] = _tier_column()
    # The tier that serves the answer; ``explored`` the tiers generated beside it for labels.
    tier: Mapped[str] = _tier_column()
    explored: Mapped[list[str]] = mapped_column(nullable=False, default=list)
    # Cost units the budget keeper charged (above the cheapest tier), and what it said.
    spent: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    budget_reason: Mapped[str] = mapped_column(Text, nullable=False)
    # When the chosen tier could not serve (its worker kept failing, or it was out of
    # service), the tier it was and why.
    rerouted_from: Mapped[str | None] = _tier_column(nullable=True)
    # Escalation: a tier being generated because the answer scored below the threshold, and
    # every escalation made ({"from", "to", "quality_from", "quality_to"}).
    escalating_to: Mapped[str | None] = _tier_column(nullable=True)
    escalations: Mapped[list[dict[str, Any]]] = mapped_column(nullable=False, default=list)
    reroute_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _utc_now_column()

    # recent_predictions(): a version's latest decisions, newest first, without reading
    # every other version's. spend_since(): the decisions of the last minutes.
    __table_args__ = (
        Index("ix_routing_decisions_router_version_id", "router_version", "id"),
        Index("ix_routing_decisions_created_at", "created_at"),
    )


class Generation(Base):
    __tablename__ = "generations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("generation_requests.id", ondelete="CASCADE"), nullable=False
    )
    tier: Mapped[str] = _tier_column()
    model: Mapped[str] = mapped_column(String(500), nullable=False)
    image_path: Mapped[str] = mapped_column(String(500), nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _utc_now_column()

    __table_args__ = (
        UniqueConstraint("request_id", "tier", name="uq_generations_request_tier"),
        # spend_since(): the images of the last minutes.
        Index("ix_generations_created_at", "created_at"),
    )


class QualityScore(Base):
    __tablename__ = "quality_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    generation_id: Mapped[int] = mapped_column(
        ForeignKey("generations.id", ondelete="CASCADE"), nullable=False
    )
    request_id: Mapped[str] = mapped_column(
        ForeignKey("generation_requests.id", ondelete="CASCADE"), nullable=False
    )
    tier: Mapped[str] = _tier_column()
    metrics_version: Mapped[str] = mapped_column(String(32), nullable=False)
    scores: Mapped[dict[str, Any]] = mapped_column(nullable=False)
    mean_score: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = _utc_now_column()

    __table_args__ = (
        UniqueConstraint("generation_id", "metrics_version", name="uq_quality_scores_generation"),
        Index("ix_quality_scores_request_version", "request_id", "metrics_version"),
    )


class StepStatus(enum.StrEnum):
    """pending: its message was sent (or is about to be). running: a worker started it.
    done: its work is written. failed: it gave up, and so did its request. abandoned: an
    exploration step that gave up, on the side; its request is not failed for it."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ABANDONED = "abandoned"


OPEN_STEP_STATUSES = (StepStatus.PENDING, StepStatus.RUNNING)


class Dispatch(Base):
    """One row per step a request needs (``route``, ``generate:TIER``, ``score:TIER``): what
    was sent and when, and how its attempts went. Recorded in the transaction that decides
    the step is needed, before its message is sent, so a step is never forgotten: the
    sweeper re-sends one whose message can be shown lost, and only that."""

    __tablename__ = "dispatches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("generation_requests.id", ondelete="CASCADE"), nullable=False
    )
    step: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[StepStatus] = mapped_column(
        _string_enum(StepStatus, "step_status"), nullable=False, default=StepStatus.PENDING
    )
    # Messages sent for it; deliveries a worker started; failed attempts.
    sends: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    starts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    dispatched_at: Mapped[datetime] = _utc_now_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Last time the sweeper found its message in the broker (waiting, not lost).
    seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("request_id", "step", name="uq_dispatches_request_step"),
        # The sweeper's steps not finished yet, by age. The condition is finished_at, which
        # every close sets, not the status: a lookup of a request's open steps by status
        # then cannot take this index for one that reads every open step, and a change of
        # status between pending and running stays a HOT update.
        Index(
            "ix_dispatches_unfinished",
            "dispatched_at",
            postgresql_where=text("finished_at IS NULL"),
            sqlite_where=text("finished_at IS NULL"),
        ),
    )


class TierHealth(Base):
    """Consecutive generation failures per tier; a tier whose failures reach the threshold
    is out of routing until ``open_until`` (a circuit breaker shared by every router)."""

    __tablename__ = "tier_health"

    tier: Mapped[str] = mapped_column(String(64), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    open_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = _utc_now_column()


class RouterVersion(Base):
    __tablename__ = "router_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    kind: Mapped[str] = mapped_column(String(50), nullable=False)
    path: Mapped[str] = mapped_column(String(500), nullable=False)
    n_train_pairs: Mapped[int] = mapped_column(Integer, nullable=False)
    evaluation: Mapped[dict[str, Any]] = mapped_column(nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = _utc_now_column()
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "uq_router_versions_one_active",
            "is_active",
            unique=True,
            postgresql_where=text("is_active"),
            sqlite_where=text("is_active"),
        ),
    )


class RouterEvent(enum.StrEnum):
    """What happened to a router version: registered by the retraining job; promoted (by the
    gate or an operator); refused by the gate; rolled back (an operator returned to the one
    before)."""

    REGISTERED = "registered"
    PROMOTED = "promoted"
    REFUSED = "refused"
    ROLLED_BACK = "rolled_back"


class RouterEventRow(Base):
    """One event of a router version's history (migration 0005 says why ``version`` is a name,
    not a key: a baseline policy has a history too)."""

    __tablename__ = "router_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(200), nullable=False)
    event: Mapped[str] = mapped_column(String(16), nullable=False)
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(nullable=False)
    at: Mapped[datetime] = _utc_now_column()

    __table_args__ = (
        CheckConstraint(
            "event IN ('registered', 'promoted', 'refused', 'rolled_back')", name="event"
        ),
        Index("ix_router_events_version_id", "version", "id"),
    )


class ApiKey(Base):
    """A key of the HTTP API. Only the key's SHA-256 is kept (``workers.services.keys`` says why
    that
    is enough for a random key); ``key_prefix`` names it in listings. ``callback_secret``
    signs the callbacks to this key's URLs, so it is kept as it is."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    key_prefix: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    is_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    callback_secret: Mapped[str] = mapped_column(String(100), nullable=False)
    created_at: Mapped[datetime] = _utc_now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CallbackState(enum.StrEnum):
    """pending: to be POSTed (again) at ``next_attempt_at``. delivered: the receiver answered
    2xx, and it is never sent again. failed: every attempt failed, or it cannot be sent."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class CallbackDelivery(Base):
    """The outbox of a request's callback: written in the transaction that ends the request
    (``db.queries.record_callbacks``), so an ended request with a callback URL always has
    one, whoever ended it and whatever happened to the message sent after commit. One per
    request. ``next_attempt_at`` is both when the next attempt is due and, while an attempt
    is in flight, the end of its claim (``workers/stages/callbacks.py``)."""

    __tablename__ = "callback_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("generation_requests.id", ondelete="CASCADE"), unique=True, nullable=False
    )
    url: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[CallbackState] = mapped_column(
        _string_enum(CallbackState, "callback_state"),
        nullable=False,
        default=CallbackState.PENDING,
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = _utc_now_column()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _utc_now_column()

    __table_args__ = (
        # The sweep's pending deliveries by when they are due; delivered and failed ones,
        # which are most of the table, are not in it.
        Index(
            "ix_callback_deliveries_pending",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
    )


class CallbackAttempt(Base):
    """One POST of a callback and how it went: the receiver's status, or why there was none.
    A row per attempt rather than a JSON list on the delivery: attempts are appended by
    whichever worker made them, never rewritten, and can be counted by outcome in SQL."""

    __tablename__ = "callback_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("callback_deliveries.id", ondelete="CASCADE"), nullable=False
    )
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float, nullable=False)
    worker: Mapped[str | None] = mapped_column(String(200))
    attempted_at: Mapped[datetime] = _utc_now_column()

    __table_args__ = (
        UniqueConstraint("delivery_id", "number", name="uq_callback_attempts_delivery_number"),
    )
