"""HTTP API: other services submit prompts, follow them, fetch their images, list and cancel
them; operators read the budget, readiness and metrics.

Validation is the producer's: a JSON body is validated by the same ``RequestSpec`` as the
Python client's arguments and the CLI's options, so a refused request gets the same message
here, with status 422, and nothing is enqueued. What only HTTP can get wrong (another media
type, a body too large, a body that is no JSON object, the key in the body rather than in the
``Idempotency-Key`` header, a query parameter) is refused before that. Every refusal, 4xx or
503, is an RFC 9457 problem naming the offending fields.

Auth: API keys (``workers.services.keys``), sent as ``Authorization: Bearer <key>`` or
``X-API-Key``.
They are required unless ``T2IROUTE_API_AUTH`` says ``off``, or says ``auto`` (the default)
and ``t2iroute api`` listens on loopback, as Flower's basic auth is. A key sees, cancels and
lists only the requests it made, unless it is an admin key; another key's request is "not
found" (404), so that a key learns nothing of what others asked. Where keys are not required,
a request without one sees everything, and one with a key is still held to it."""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import sys
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from email.message import Message
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

import workers.stages.callbacks  # noqa: F401 (a cancel ends a request: its callback goes after commit)
from db import queries
from db.models import GenerationRequest, Status
from db.session import session_scope
from workers.app import flow
from workers.schemas import RequestView, request_view
from workers.services import keys
from workers.services.budget import BudgetKeeper, BudgetLimits, budget_redis
from workers.services.images import ImageStore, StoreUnavailable
from workers.services.keys import Caller
from workers.services.producer import (
    MAX_KEY_CHARS,
    MAX_URL_CHARS,
    FieldProblem,
    InvalidRequest,
    RequestSpec,
    check_key,
    parse_request,
    refusal_message,
    submit,
)
from workers.services.telemetry import ACCEPTED, REFUSED, api_exposition
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE = "urn:t2iroute:problem:"
KEY_HEADER = "Idempotency-Key"
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
#: A listing's page: this many requests unless the caller asks for fewer, never more.
DEFAULT_PAGE, MAX_PAGE = 50, 200
#: Images never change once written: a client or its private cache may keep one for a year.
IMAGE_CACHE = "private, max-age=31536000, immutable"
#: How long readiness waits for the broker and the budget Redis.
READY_TIMEOUT_SECONDS = 2.0
#: The Retry-After of a 503 while the database is unreachable: about a restart's length.
UNAVAILABLE_RETRY_SECONDS = 5
#: What the database is when it cannot be reached: a refused or broken connection, or no
#: connection free in the pool in time.
DATABASE_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


# --- problems (RFC 9457) -----------------------------------------------------------------------


class Problem(Exception):
    """A refusal answered as RFC 9457 problem details (validation refusals are
    ``InvalidRequest``, answered the same way)."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        *,
        errors: list[FieldProblem] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.errors = errors or []
        self.headers = headers


class FieldError(BaseModel):
    field: str
    detail: str


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; ``errors`` names each offending field."""

    type: str = Field(examples=["urn:t2iroute:problem:invalid-request"])
    title: str
    status: int
    detail: str
    errors: list[FieldError]


def _problem_response(problem: Problem) -> JSONResponse:
    REFUSED.labels(status=str(problem.status)).inc()
    body = ProblemDetails(
        type=PROBLEM_TYPE + problem.kind,
        title=problem.title,
        status=problem.status,
        detail=problem.detail,
        errors=[FieldError(field=p.field, detail=p.message) for p in problem.errors],
    )
    return JSONResponse(
        body.model_dump(),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


def _invalid(problems: list[FieldProblem]) -> Problem:
    return Problem(
        422, "invalid-request", "Invalid request", refusal_message(problems), errors=problems
    )


def _refused(field: str, message: str) -> InvalidRequest:
    return InvalidRequest.from_problems([FieldProblem(field, message)])


def _not_found(what: str) -> Problem:
    return Problem(404, "not-found", "Not found", what)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return _problem_response(exc)


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequest)
    # The producer's own wording: a refused field's, or an idempotency key's reused with
    # other parameters, which names each field that differs.
    return _problem_response(
        Problem(422, "invalid-request", "Invalid request", str(exc), errors=list(exc.problems))
    )


def _first_line(exc: BaseException) -> str:
    """An error in one line: the driver's own error where SQLAlchemy wraps one, the first
    line of its message (psycopg's run to three, SQLAlchemy adds the statement)."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def _route(request: Request) -> str:
    # The route's template rather than the path, which is the client's text, decoded.
    return str(getattr(request.scope.get("route"), "path", None) or ascii(request.url.path))


async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
    # One line per request: the cause is the same for every request of an outage, and a
    # traceback each (some 200 lines through psycopg and SQLAlchemy) would bury the log.
    log.warning(
        "%s %s: the database is unreachable (%s)",
        request.method,
        _route(request),
        _first_line(exc),
    )
    return _problem_response(
        Problem(
            503,
            "unavailable",
            "Service unavailable",
            "the database is unreachable; try again shortly",
            errors=[FieldProblem("database", "unreachable")],
            headers={"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)},
        )
    )


def _field(location: tuple[int | str, ...]) -> str:
    # FastAPI's locations start with where the value was ("query", "path", "header").
    name = ".".join(str(part) for part in location[1:] or location)
    return name if name.isidentifier() or name.replace("-", "_").isidentifier() else ascii(name)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        FieldProblem(
            _field(tuple(error["loc"])),
            str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"],
        )
        for error in exc.errors()
    ]
    return _problem_response(_invalid(problems))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    return _problem_response(
        Problem(
            exc.status_code,
            phrase.lower().replace(" ", "-"),
            phrase,
            str(exc.detail),
            headers=exc.headers,
        )
    )


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of these refusals."""
    return {
        status: {
            "model": ProblemDetails,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
        }
        for status in statuses
    }


# --- auth ------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key (`t2iroute keys create`)")
_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key, instead of Authorization"
)


def keys_required_at(settings: Settings, host: str | None) -> bool:
    """Whether the API requires keys when it listens on ``host`` (None: unknown, as when
    uvicorn runs the app itself). ``auto``: off loopback, or where unknown."""
    if settings.api_auth != "auto":
        return settings.api_auth == "required"
    return host not in LOOPBACK


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"}
    )


def caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_key_header)],
) -> Caller:
    """Who is asking: the live API key sent, or nobody where keys are not required."""
    settings = get_settings()
    sent = {key for key in (bearer.credentials if bearer else None, header_key) if key}
    if len(sent) > 1:
        raise _unauthorized("two different API keys (Authorization and X-API-Key)")
    if not sent:
        required = request.app.state.require_keys
        if keys_required_at(settings, None) if required is None else required:
            raise _unauthorized(
                "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>"
            )
        return Caller(key_id=None, name=None, sees_all=True)
    with session_scope(settings.database_url) as session:
        row = keys.authenticate(session, sent.pop())
    if row is None:
        raise _unauthorized("the API key is unknown or revoked")
    return Caller(key_id=row.id, name=row.name, sees_all=row.is_admin)


CallerDep = Annotated[Caller, Depends(caller)]


def _visible(session: Session, request_id: str, who: Caller) -> GenerationRequest:
    """The request, if it exists and ``who`` may see it; a 404 problem otherwise."""
    try:
        canonical = str(uuid.UUID(request_id)) == request_id
    except ValueError:
        canonical = False
    row = queries.get_request(session, request_id) if canonical else None
    if row is None or not who.may_see(row.api_key_id):
        raise _not_found(f"no request {request_id!a}")
    return row


# --- POST /v1/requests -----------------------------------------------------------------------


class Accepted(BaseModel):
    id: str
    created: bool = Field(description="False when an earlier request had this idempotency key")
    enqueued: bool = Field(description="False when the broker was down: the sweeper sends it")


def max_body_bytes(settings: Settings) -> int:
    """The largest body read: a prompt at the limit with every character JSON-escaped as a
    surrogate pair (12 bytes), metadata and a callback URL at theirs with every byte escaped
    (6), and room for the other fields."""
    return 12 * settings.max_prompt_chars + 6 * (settings.max_metadata_bytes + MAX_URL_CHARS) + 4096


def _require_json(request: Request) -> None:
    stated = request.headers.get("content-type")
    header = Message()
    header["content-type"] = stated or ""
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    # RFC 8259: JSON exchanged between systems is UTF-8; a compressed body would be read
    # as garbage, so it is refused as an unsupported media type (RFC 9110, 15.5.16).
    if (
        stated is None
        or header.get_content_type() != "application/json"
        or header.get_content_charset("utf-8") != "utf-8"
        or coding != "identity"
    ):
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "send the request as application/json in UTF-8, without content coding",
        )


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = Problem(
        413, "body-too-large", "Body too large", f"the body is larger than {limit} bytes"
    )
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:
        declared = 0
    if declared > limit:
        raise too_large
    # A chunked body states no length: count while reading, and stop at the limit.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of repeated names silently; two readers of one body could then
    # disagree on what it asks for.
    fields = dict(pairs)
    if len(fields) < len(pairs):
        repeated = sorted(
            name for name, count in collections.Counter(n for n, _ in pairs).items() if count > 1
        )
        raise _refused("body", f"names {', '.join(map(ascii, repeated))} more than once")
    return fields


def _parse_object(body: bytes) -> dict[str, Any]:
    # Undecodable bytes become lone surrogates (PEP 383, as Python decodes a command-line
    # argument), so that the producer refuses them with the message the CLI gives.
    text = body.decode("utf-8", "surrogateescape")
    try:
        value = json.loads(text, object_pairs_hook=_object)
    except InvalidRequest:
        raise
    except json.JSONDecodeError as exc:
        raise _refused("body", f"is not JSON: {exc}") from None
    except RecursionError:
        raise _refused("body", "is nested too deeply") from None
    except ValueError:
        raise _refused("body", "holds a number with too many digits") from None
    if not isinstance(value, dict):
        raise _refused("body", "must be a JSON object")
    return value


async def _body_fields(request: Request) -> dict[str, Any]:
    """The request's JSON object, not yet validated."""
    _require_json(request)
    return _parse_object(await _read_body(request, max_body_bytes(get_settings())))


def _idempotency_key(request: Request) -> str | None:
    values = request.headers.getlist(KEY_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise _refused("idempotency_key", f"the {KEY_HEADER} header is given more than once")
    # Starlette decodes header bytes as latin-1; clients send UTF-8, so the bytes are
    # recovered and decoded as such ("clé-1" stays "clé-1"). Undecodable bytes become lone
    # surrogates, which the producer refuses as it refuses them from the CLI.
    return values[0].encode("latin-1").decode("utf-8", "surrogateescape")


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


router = APIRouter()


@router.post(
    "/v1/requests",
    status_code=202,
    response_model=Accepted,
    responses=_problems(401, 413, 415, 422, 503),
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
    fields: Annotated[dict[str, Any], Depends(_body_fields)],
    idempotency_key: Annotated[str | None, Depends(_idempotency_key)],
    response: Response,
) -> Accepted:
    """Accept a prompt: routed, generated and scored by the workers. 202 with its id."""
    settings = get_settings()
    spec = _validated(settings, fields, idempotency_key)
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


class RequestSummary(BaseModel):
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


class RequestPage(BaseModel):
    items: list[RequestSummary] = Field(description="Newest first")
    next: str | None = Field(description="The cursor of the next page; null on the last")


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
        raise _invalid([FieldProblem("cursor", "is not a cursor this API gave")]) from None
    return at, request_id


def _moment(field: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise _invalid([FieldProblem(field, "must state its UTC offset (e.g. Z)")])
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise _invalid([FieldProblem(field, "is out of range")]) from None


def _tier(settings: Settings, tier: str, field: str = "tier") -> str:
    if tier not in settings.pool.names:
        names = ", ".join(settings.pool.names)
        raise _invalid([FieldProblem(field, f"no tier {tier!a} in the pool ({names})")])
    return tier


@router.get("/v1/requests", response_model=RequestPage, responses=_problems(401, 422, 503))
def list_requests(
    who: CallerDep,
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
    settings = get_settings()
    if idempotency_key is not None:
        try:
            check_key(idempotency_key)
        except ValueError as exc:
            raise _invalid([FieldProblem("idempotency_key", str(exc))]) from None
    where = queries.RequestFilter(
        owner=None if who.sees_all else who.key_id,
        status=status,
        tier=None if tier is None else _tier(settings, tier),
        created_after=_moment("created_after", created_after),
        created_before=_moment("created_before", created_before),
        idempotency_key=idempotency_key,
    )
    before = None if cursor is None else _after(cursor)
    with session_scope(settings.database_url) as session:
        rows = queries.list_requests(session, where, limit=limit + 1, before=before)
        page = rows[:limit]
        decisions = queries.get_decisions(session, [row.id for row in page])
    items = [
        RequestSummary(
            id=row.id,
            status=row.status,
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
    "/v1/requests/{request_id}", response_model=RequestView, responses=_problems(401, 404, 503)
)
def read_request(request_id: str, who: CallerDep) -> RequestView:
    """Where a request stands: state, timings of each step, the decision, every image and
    its quality per metric."""
    with session_scope(get_settings().database_url) as session:
        return request_view(session, _visible(session, request_id, who))


@router.post(
    "/v1/requests/{request_id}/cancel",
    response_model=RequestView,
    responses=_problems(401, 404, 409, 503),
)
def cancel_request(request_id: str, who: CallerDep) -> RequestView:
    """Cancel a request that is not generating yet (queued, or routed with no image begun):
    it ends ``cancelled`` and nothing more is done for it. A request already cancelled
    answers the same; one generating or ended is a 409 problem saying why."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        _visible(session, request_id, who)
        outcome = queries.cancel(session, request_id, early_steps=[flow.ROUTE.key])
        if outcome is None:
            raise _not_found(f"no request {request_id!a}")
        if outcome.refusal is not None:
            raise Problem(
                409,
                "too-late-to-cancel",
                "Too late to cancel",
                f"request {request_id} is {outcome.status} and cannot be cancelled: "
                f"{outcome.refusal}",
            )
    with session_scope(settings.database_url) as session:
        return request_view(session, _visible(session, request_id, who))


def _image_of(
    session: Session, row: GenerationRequest, tier: str | None, settings: Settings
) -> str:
    """The store path of the request's image on ``tier`` (the answer's when None), or the
    problem that says why there is none: 404 while it may still come, 409 when it never
    will, 404 for a tier the request was not generated on."""
    ended = row.status in (Status.FAILED, Status.CANCELLED)
    decision = queries.get_decision(session, row.id)
    if tier is None:
        if ended:
            raise Problem(409, "no-image", "No image", f"the request is {row.status}: no image")
        if row.status is not Status.DONE or decision is None:
            raise Problem(
                404,
                "not-ready",
                "Not there yet",
                f"the request is {row.status}: its answer is not there yet "
                "(it is served once the request is done)",
            )
        tier = decision.tier
    elif tier not in settings.pool.names:
        raise _not_found(f"no tier {tier!a} in the pool ({', '.join(settings.pool.names)})")
    generation = queries.get_generation(session, row.id, tier)
    if generation is not None:
        return generation.image_path
    wanted = decision is not None and tier in queries.wanted_tiers(decision)
    if decision is not None and not wanted:
        raise _not_found(f"the request was not generated on tier {tier}")
    if ended:
        raise Problem(409, "no-image", "No image", f"the request is {row.status}: no image")
    raise Problem(
        404, "not-ready", "Not there yet", f"the request is {row.status}: no image yet on {tier}"
    )


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get(
    "/v1/requests/{request_id}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        304: {"description": "Not modified: the image the client holds"},
        **_problems(401, 404, 409, 422, 503),
    },
)
def read_image(
    request_id: str,
    who: CallerDep,
    tier: Annotated[
        str | None, Query(max_length=64, description="An explored tier's image instead")
    ] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The answer's PNG, once the request is done; with ``tier``, that tier's, once made.
    An image never changes: it carries an ETag and may be cached for good."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        path = _image_of(session, _visible(session, request_id, who), tier, settings)
    try:
        data = ImageStore(settings.image_store).resolve(path).read_bytes()
    except (OSError, ValueError):
        log.exception("image %s of request %s cannot be read", path, request_id)
        raise _not_found("the image is recorded but missing from the image store") from None
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE}
    if _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/png", headers=headers)


# --- the budget ------------------------------------------------------------------------------


class BudgetView(BaseModel):
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


_keepers: dict[str, BudgetKeeper] = {}


def _buckets(settings: Settings) -> tuple[dict[str, float] | None, str | None]:
    if settings.budget_backend != "redis":
        return None, "the budget backend is local: its buckets live in the router's process"
    if settings.redis_url not in _keepers:
        _keepers[settings.redis_url] = BudgetKeeper.from_settings(settings)
    try:
        return _keepers[settings.redis_url].stats(), None
    except RedisError as exc:
        log.warning("GET /v1/budget: the budget Redis is unreachable (%s)", _first_line(exc))
        return None, f"the budget Redis is unreachable ({type(exc).__name__})"


@router.get("/v1/budget", response_model=BudgetView, responses=_problems(401, 422, 503))
def read_budget(
    who: CallerDep,
    window_minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
) -> BudgetView:
    """Tokens per bucket, the spend of the last minutes against the budget, per-tier counts."""
    settings = get_settings()
    limits = BudgetLimits.from_settings(settings)
    buckets, error = _buckets(settings)
    with session_scope(settings.database_url) as session:
        since = queries.database_now(session) - timedelta(minutes=window_minutes)
        spend = queries.spend_since(session, since)
        tradeoff = queries.latest_tradeoff(session)
    tiers = settings.pool.names
    return BudgetView(
        backend=settings.budget_backend,
        budget_per_request=limits.budget_per_request,
        burst=limits.burst,
        extra_cost={tier: limits.extra_cost(tier) for tier in tiers},
        buckets=buckets,
        buckets_error=error,
        window_minutes=window_minutes,
        since=since,
        decisions=spend.decisions,
        spent=spend.spent,
        allowed=limits.budget_per_request * spend.decisions + limits.burst,
        answers={tier: spend.answers.get(tier, 0) for tier in tiers},
        generations={tier: spend.generations.get(tier, 0) for tier in tiers},
        tradeoff=tradeoff,
    )


# --- health, readiness, metrics --------------------------------------------------------------


@router.get("/healthz")
def health() -> dict[str, str]:
    """The process is up (readiness is /readyz)."""
    return {"status": "ok"}


def _database(settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(text("SELECT 1"))


def _broker(settings: Settings) -> None:
    from kombu import Connection

    with Connection(settings.broker_url, connect_timeout=READY_TIMEOUT_SECONDS) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=READY_TIMEOUT_SECONDS)


def _budget_redis(settings: Settings) -> None:
    if settings.budget_backend == "redis":
        budget_redis(settings.redis_url, READY_TIMEOUT_SECONDS).ping()


def _image_store(settings: Settings) -> None:
    ImageStore(settings.image_store).check_writable()


READINESS: dict[str, Callable[[Settings], None]] = {
    "database": _database,
    "broker": _broker,
    "budget": _budget_redis,
    "images": _image_store,
}


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@router.get("/readyz", response_model=Readiness, responses=_problems(503))
def ready() -> Readiness:
    """Ready when the database, the broker and the budget Redis answer and the image store
    takes a small file; else a 503 problem naming what does not (the error itself goes to the
    log, not to the caller)."""
    settings = get_settings()
    down: list[FieldProblem] = []
    for name, check in READINESS.items():
        try:
            check(settings)
        except StoreUnavailable as exc:
            log.warning("readiness: %s cannot take a file: %s", name, exc)
            down.append(FieldProblem(name, f"cannot take a file ({exc.reason})"))
        except Exception as exc:
            log.warning("readiness: %s is unreachable", name, exc_info=True)
            down.append(FieldProblem(name, f"unreachable ({type(exc).__name__})"))
    if down:
        raise Problem(
            503,
            "not-ready",
            "Not ready",
            "not ready: " + "; ".join(f"{p.field}: {p.message}" for p in down),
            errors=down,
        )
    return Readiness(status="ready", checks=dict.fromkeys(READINESS, "ok"))


@router.get("/metrics", response_class=Response)
def metrics() -> Response:
    """Prometheus metrics: the API's counters and the system's state
    (workers/services/telemetry.py)."""
    body, content_type = api_exposition()
    return Response(body, media_type=content_type)


# --- the app ---------------------------------------------------------------------------------


def create_app(*, require_keys: bool | None = None) -> FastAPI:
    """The API. ``require_keys`` None: as ``T2IROUTE_API_AUTH`` says for an unknown address
    (``auto``: required), read at each request."""
    app = FastAPI(
        title="t2iroute",
        version="0.2.0",
        description="Edge-cloud routing for text-to-image generation: submit prompts, follow "
        "them, fetch their images.",
    )
    app.state.require_keys = require_keys
    app.include_router(router)
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(InvalidRequest, _on_invalid)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    for error in DATABASE_DOWN:
        app.add_exception_handler(error, _on_database_down)
    return app


#: The app as ``uvicorn workers.entrypoints.http.app:app`` serves it: keys required
#: unless T2IROUTE_API_AUTH is off, since the address it listens on is unknown here.
app = create_app()


def serve(host: str, port: int) -> None:
    """Serve the API on ``host``: keys required off loopback unless T2IROUTE_API_AUTH says
    otherwise (``t2iroute api``)."""
    import uvicorn

    required = keys_required_at(get_settings(), host)
    print(f"API keys {'required' if required else 'not required'} on {host}", file=sys.stderr)
    uvicorn.run(create_app(require_keys=required), host=host, port=port, log_level="info")
