"""The queries the workers need, one module per subject: ``requests``, ``steps`` (the
dispatches), ``tiers`` (tier health), ``decisions``, ``generations`` (images and their
quality scores), ``pairs`` (labelled pairs), ``versions`` (router versions), ``callbacks``
(the outbox) and ``reports`` (traffic reads and the scrape's counts), over ``common``
(idempotent inserts, the database clock). Every public name is gathered here: callers write
``from db import queries`` and ``queries.transition(...)``.

Inserts are ``ON CONFLICT DO NOTHING`` and state changes are conditional, so a late or
duplicate delivery changes nothing. The batched forms (``get_requests``, ``start_steps``...)
stand beside their singular forms: they read and write the requests of a batch in one
statement each, a request id list (``IN``) on the primary key or the (request_id, step) and
(request_id, tier) unique indexes, with one step or tier per statement, so that every plan is
an index lookup per id."""

from __future__ import annotations

from db.queries.callbacks import (
    CALLBACKS_TO_SEND,
    CallbackClaim,
    CallbackOutcome,
    callback_attempts,
    callback_delivery,
    callback_secret_of,
    claim_callback,
    overdue_callbacks,
    record_callbacks,
    settle_callback,
)
from db.queries.common import database_now, insert_ignore, insert_ignore_many
from db.queries.decisions import (
    get_decision,
    get_decisions,
    latest_tradeoff,
    recent_predictions,
    recent_spend,
    tiers_wanted,
    wanted_tiers,
)
from db.queries.generations import (
    generations_of,
    get_generation,
    get_generations,
    mean_quality_of,
    quality_scores_of,
    scored_tiers,
    scored_tiers_many,
)
from db.queries.pairs import labelled_pairs, labelled_prompts, training_pairs
from db.queries.reports import Spend, spend_since, status_counts
from db.queries.requests import (
    Cancellation,
    RequestFilter,
    cancel,
    fail,
    get_request,
    get_requests,
    list_requests,
    transition,
    transition_many,
)
from db.queries.steps import (
    OverdueStep,
    StepStart,
    claim_resends,
    fail_attempt,
    finish_step,
    finish_steps,
    mark_seen,
    overdue_steps,
    record_steps,
    record_steps_many,
    start_step,
    start_steps,
    step_status,
    steps_of,
)
from db.queries.tiers import (
    record_tier_failure,
    record_tier_success,
    tier_failure_counts,
    unavailable_tiers,
)
from db.queries.versions import (
    active_router_version,
    deactivate_router_versions,
    promote_router_version,
    record_router_event,
    router_events,
    router_version,
    router_versions,
)

__all__ = [
    "CALLBACKS_TO_SEND",
    "CallbackClaim",
    "CallbackOutcome",
    "Cancellation",
    "OverdueStep",
    "RequestFilter",
    "Spend",
    "StepStart",
    "active_router_version",
    "callback_attempts",
    "callback_delivery",
    "callback_secret_of",
    "cancel",
    "claim_callback",
    "claim_resends",
    "database_now",
    "deactivate_router_versions",
    "fail",
    "fail_attempt",
    "finish_step",
    "finish_steps",
    "generations_of",
    "get_decision",
    "get_decisions",
    "get_generation",
    "get_generations",
    "get_request",
    "get_requests",
    "insert_ignore",
    "insert_ignore_many",
    "labelled_pairs",
    "labelled_prompts",
    "latest_tradeoff",
    "list_requests",
    "mark_seen",
    "mean_quality_of",
    "overdue_callbacks",
    "overdue_steps",
    "promote_router_version",
    "quality_scores_of",
    "recent_predictions",
    "recent_spend",
    "record_callbacks",
    "record_router_event",
    "record_steps",
    "record_steps_many",
    "record_tier_failure",
    "record_tier_success",
    "router_events",
    "router_version",
    "router_versions",
    "scored_tiers",
    "scored_tiers_many",
    "settle_callback",
    "spend_since",
    "start_step",
    "start_steps",
    "status_counts",
    "step_status",
    "steps_of",
    "tier_failure_counts",
    "tiers_wanted",
    "training_pairs",
    "transition",
    "transition_many",
    "unavailable_tiers",
    "wanted_tiers",
]
