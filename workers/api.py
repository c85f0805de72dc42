"""HTTP producer API: other services submit prompts and read where they stand.

Validation is the producer's: a JSON body is validated by the same ``RequestSpec`` as the
Python client's arguments and the CLI's options, so a refused request gets the same message
here, with status 422, and nothing is enqueued. What only HTTP can get wrong (another media
type, a body too large, a body that is no JSON object, the key in the body rather than in the
``Idempotency-Key`` header) is refused before that. Every refusal is an RFC 9457 problem."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from email.message import Message
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from db import queries
from db.session import session_scope
from workers.producer import (
    FieldProblem,
    InvalidRequest,
    RequestSpec,
    describe,
    parse_request,
    submit,
)
from workers.settings import Settings, get_settings

ACCEPTED = Counter("t2iroute_requests_accepted_total", "Requests accepted", ["created"])
REFUSED = Counter("t2iroute_requests_refused_total", "Requests refused at validation")


class TierHealthCollector(Collector):
    """Each tier's run of failed generations and whether its breaker has it out of routing,
    read from the database at scrape time (every worker writes it; any API reports it)."""

    def collect(self) -> Iterator[Metric]:
        failures = GaugeMetricFamily(
            "t2iroute_tier_consecutive_failures",
            "Generations failed in a row on the tier",
            labels=["tier"],
        )
        out = GaugeMetricFamily(
            "t2iroute_tier_out_of_service",
            "1 while the tier's circuit breaker keeps it out of routing",
            labels=["tier"],
        )
        try:
            with session_scope(get_settings().database_url) as session:
                down = queries.unavailable_tiers(session)
                for tier, count in queries.tier_failure_counts(session).items():
                    failures.add_metric([tier], count)
                    out.add_metric([tier], 1.0 if tier in down else 0.0)
        except SQLAlchemyError:
            return  # a scrape during a database outage reports the counters alone
        yield failures
        yield out


REGISTRY.register(TierHealthCollector())

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE = "urn:t2iroute:problem:"
KEY_HEADER = "Idempotency-Key"

app = FastAPI(title="t2iroute", version="0.1.0")


class Problem(Exception):
    """A refusal of what only HTTP can get wrong, answered as RFC 9457 problem details."""

    def __init__(self, status: int, kind: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail


class Accepted(BaseModel):
    id: str
    created: bool
    enqueued: bool


def _problem_response(
    status: int, kind: str, title: str, detail: str, errors: list[dict[str, str]]
) -> JSONResponse:
    REFUSED.inc()
    return JSONResponse(
        {
            "type": PROBLEM_TYPE + kind,
            "title": title,
            "status": status,
            "detail": detail,
            "errors": errors,
        },
        status_code=status,
        media_type=PROBLEM_JSON,
    )


@app.exception_handler(Problem)
async def _refuse(request: Request, exc: Problem) -> JSONResponse:
    return _problem_response(exc.status, exc.kind, exc.title, exc.detail, [])


@app.exception_handler(InvalidRequest)
async def _refuse_invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
    errors = [{"field": p.field, "detail": p.message} for p in exc.problems]
    return _problem_response(422, "invalid-request", "Invalid request", str(exc), errors)


def max_body_bytes(settings: Settings) -> int:
    """The largest body read: a prompt at the limit with every character JSON-escaped as a
    surrogate pair (12 bytes), and room for the other fields."""
    return 12 * settings.max_prompt_chars + 4096


def _refused(field: str, message: str) -> InvalidRequest:
    return InvalidRequest.from_problems([FieldProblem(field, message)])


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


_PROBLEM_RESPONSE: dict[str, Any] = {"content": {PROBLEM_JSON: {}}}
_BODY = {"required": True, "content": {"application/json": {"schema": _body_schema()}}}


@app.post(
    "/v1/requests",
    status_code=202,
    response_model=Accepted,
    responses={
        413: {"description": "Body too large", **_PROBLEM_RESPONSE},
        415: {"description": "Not a UTF-8 JSON body", **_PROBLEM_RESPONSE},
        422: {"description": "Invalid request", **_PROBLEM_RESPONSE},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _body_schema()}},
        }
    },
)
def create_request(
    fields: Annotated[dict[str, Any], Depends(_body_fields)],
    idempotency_key: Annotated[str | None, Depends(_idempotency_key)],
) -> Accepted:
    settings = get_settings()
    spec = _validated(settings, fields, idempotency_key)
    result = submit(spec.prompt, settings=settings, **spec.model_dump(exclude={"prompt"}))
    ACCEPTED.labels(created=str(result.created).lower()).inc()
    return Accepted(id=result.request_id, created=result.created, enqueued=result.enqueued)


@app.get("/v1/requests/{request_id}")
def read_request(request_id: str) -> dict[str, Any]:
    info = describe(request_id)
    if info is None:
        raise HTTPException(status_code=404, detail=f"no request {request_id}")
    return info


@app.get("/healthz")
def health() -> dict[str, str]:
    with session_scope(get_settings().database_url) as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok"}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
