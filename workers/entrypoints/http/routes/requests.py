"""``/v1/requests``: submit a prompt, list requests a page at a time, read one, cancel one.

Validation is the producer's: a JSON body is validated by the same ``RequestSpec`` as the
Python client's arguments and the CLI's options, so a refused request gets the same message
here, with status 422, and nothing is enqueued. What only HTTP can get wrong is refused
before that (``workers.entrypoints.http.body``)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from db import queries
from db.models import GenerationRequest
from db.models import Status as StoredStatus
from workers.app import flow
from workers.entrypoints.http.body import KEY_HEADER, body_fields, idempotency_key
from workers.entrypoints.http.deps import CallerDep, SessionDep, SettingsDep, visible
from workers.entrypoints.http.problems import Problem, invalid, not_found, problem_responses
from workers.schemas import Accepted, RequestPage, RequestSummary, RequestView, Status
from workers.services.producer import (
    MAX_KEY_CHARS,
    FieldProblem,
    InvalidRequest,
    RequestSpec,
    check_key,
    parse_request,
    submit,
)
from workers.services.telemetry import ACCEPTED
from workers.services.views import request_view
from workers.settings import Settings

__all__ = ["router"]

#: A listing's page: this many requests unless the caller asks for fewer, never more.
DEFAULT_PAGE, MAX_PAGE = 50, 200

router = APIRouter()


# --- POST /v1/requests -----------------------------------------------------------------------


def _body_schema() -> dict[str, Any]:
    schema = RequestSpec.model_json_schema()
    del schema["properties"]["idempotency_key"]
    return schema


def _validated(settings: Settings, fields: dict[str, Any], key: str | None) -> RequestSpec:
    """The body and the header's key through the producer's validation; a key in the body is
    refused (a client would expect it honoured), together with whatever else is wrong."""
    misplaced = (
        [FieldProblem("idempotency_key", f"belongs in the {KEY_HEADER} header, not the body")]
        if "idempotency_key" in fields
        else []
    )
    stated = {name: value for name, value in fields.items() if name != "idempotency_key"}
    try:
        spec = parse_request(settings, **stated, idempotency_key=key)
    except InvalidRequest as exc:
        raise InvalidRequest.from_problems([*misplaced, *exc.problems]) from None
    if misplaced:
        raise InvalidRequest.from_problems(misplaced)
    return spec


@router.post(
    "/v1/requests",
    status_code=202,
    response_model=Accepted,
    responses=problem_responses(401, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _body_schema()}},
        },
        "parameters": [
            {
                "name": KEY_HEADER,
                "in": "header",
                "required": False,
                "description": "The same key twice gives the same request, once (per API key)",
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
            }
        ],
    },
)
def create_request(
    who: CallerDep,
    fields: Annotated[dict[str, Any], Depends(body_fields)],
    key: Annotated[str | None, Depends(idempotency_key)],
    settings: SettingsDep,
    response: Response,
) -> Accepted:
    """Accept a prompt: routed, generated and scored by the workers. 202 with its id."""
    spec = _validated(settings, fields, key)
    result = submit(
        spec.prompt,
        settings=settings,
        api_key_id=who.key_id,
        **spec.model_dump(exclude={"prompt"}),
    )
    ACCEPTED.labels(created=str(result.created).lower()).inc()
    response.headers["Location"] = f"/v1/requests/{result.request_id}"
    return Accepted(id=result.request_id, created=result.created, enqueued=result.enqueued)


# --- GET /v1/requests (listing) --------------------------------------------------------------


def _cursor(row: GenerationRequest) -> str:
    text = json.dumps([row.created_at.isoformat(), row.id])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _after(cursor: str) -> tuple[datetime, str]:
    """The position a cursor of ours stands for; a 422 problem for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        moment, request_id = json.loads(raw)
        at = datetime.fromisoformat(moment)
        if at.tzinfo is None or str(uuid.UUID(request_id)) != request_id:
            raise ValueError(cursor)
    except (ValueError, TypeError):
        raise invalid([FieldProblem("cursor", "is not a cursor this API gave")]) from None
    return at, request_id


def _moment(field: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise invalid([FieldProblem(field, "must state its UTC offset (e.g. Z)")])
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise invalid([FieldProblem(field, "is out of range")]) from None


def _tier(settings: Settings, tier: str, field: str = "tier") -> str:
    if tier not in settings.pool.names:
        names = ", ".join(settings.pool.names)
        raise invalid([FieldProblem(field, f"no tier {tier!a} in the pool ({names})")])
    return tier


@router.get("/v1/requests", response_model=RequestPage, responses=problem_responses(401, 422, 503))
def list_requests(
    who: CallerDep,
    settings: SettingsDep,
    session: SessionDep,
    status: Annotated[Status | None, Query(description="Only requests in this state")] = None,
    tier: Annotated[
        str | None, Query(max_length=64, description="Only requests routed to this tier")
    ] = None,
    created_after: Annotated[
        datetime | None, Query(description="Made at or after (ISO 8601 with offset)")
    ] = None,
    created_before: Annotated[datetime | None, Query(description="Made before")] = None,
    idempotency_key: Annotated[str | None, Query(max_length=MAX_KEY_CHARS)] = None,
    cursor: Annotated[
        str | None, Query(max_length=500, description="`next` of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> RequestPage:
    """The caller's requests (an admin key's: everyone's), newest first, a page at a time."""
    if idempotency_key is not None:
        try:
            check_key(idempotency_key)
        except ValueError as exc:
            raise invalid([FieldProblem("idempotency_key", str(exc))]) from None
    where = queries.RequestFilter(
        owner=None if who.sees_all else who.key_id,
        status=None if status is None else StoredStatus(status),
        tier=None if tier is None else _tier(settings, tier),
        created_after=_moment("created_after", created_after),
        created_before=_moment("created_before", created_before),
        idempotency_key=idempotency_key,
    )
    before = None if cursor is None else _after(cursor)
    rows = queries.list_requests(session, where, limit=limit + 1, before=before)
    page = rows[:limit]
    decisions = queries.get_decisions(session, [row.id for row in page])
    items = [
        RequestSummary(
            id=row.id,
            status=Status(row.status),
            tier=decisions[row.id].tier if row.id in decisions else None,
            created_at=row.created_at,
            updated_at=row.updated_at,
            idempotency_key=row.idempotency_key,
            failure_reason=row.failure_reason,
            metadata=row.client_metadata,
            url=f"/v1/requests/{row.id}",
        )
        for row in page
    ]
    return RequestPage(items=items, next=_cursor(page[-1]) if len(rows) > limit else None)


# --- one request -----------------------------------------------------------------------------


@router.get(
    "/v1/requests/{request_id}",
    response_model=RequestView,
    responses=problem_responses(401, 404, 503),
)
def read_request(request_id: str, who: CallerDep, session: SessionDep) -> RequestView:
    """Where a request stands: state, timings of each step, the decision, every image and
    its quality per metric."""
    return request_view(session, visible(session, request_id, who))


@router.post(
    "/v1/requests/{request_id}/cancel",
    response_model=RequestView,
    responses=problem_responses(401, 404, 409, 503),
)
def cancel_request(request_id: str, who: CallerDep, session: SessionDep) -> RequestView:
    """Cancel a request that is not generating yet (queued, or routed with no image begun):
    it ends ``cancelled`` and nothing more is done for it. A request already cancelled
    answers the same; one generating or ended is a 409 problem saying why."""
    visible(session, request_id, who)
    outcome = queries.cancel(session, request_id, early_steps=[flow.ROUTE.key])
    if outcome is None:
        raise not_found(f"no request {request_id!a}")
    if outcome.refusal is not None:
        raise Problem(
            409,
            "too-late-to-cancel",
            "Too late to cancel",
            f"request {request_id} is {outcome.status} and cannot be cancelled: {outcome.refusal}",
        )
    # The cancel commits (its callback goes after the commit) before the request is read
    # anew: the session keeps what it loaded past a commit (expire_on_commit=False).
    session.commit()
    session.expire_all()
    return request_view(session, visible(session, request_id, who))
