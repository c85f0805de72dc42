"""Refusals as RFC 9457 problem details: the ``Problem`` a route raises, and the exception
handlers that answer it, a producer's ``InvalidRequest``, FastAPI's own validation and HTTP
errors, and an unreachable database (a 503 with ``Retry-After``), all in the same shape
(``workers.schemas.ProblemDetails``) and media type."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from workers.schemas import FieldError, ProblemDetails
from workers.services.producer import FieldProblem, InvalidRequest, refusal_message
from workers.services.telemetry import REFUSED

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "add_handlers",
    "first_line",
    "invalid",
    "not_found",
    "problem_responses",
    "refused",
]

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE = "urn:t2iroute:problem:"
#: The Retry-After of a 503 while the database is unreachable: about a restart's length.
UNAVAILABLE_RETRY_SECONDS = 5
#: What the database is when it cannot be reached: a refused or broken connection, or no
#: connection free in the pool in time.
DATABASE_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


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


def invalid(problems: list[FieldProblem]) -> Problem:
    """A 422 naming each offending field."""
    return Problem(
        422, "invalid-request", "Invalid request", refusal_message(problems), errors=problems
    )


def refused(field: str, message: str) -> InvalidRequest:
    """A refusal of one field, worded as the producer words its own."""
    return InvalidRequest.from_problems([FieldProblem(field, message)])


def not_found(what: str) -> Problem:
    return Problem(404, "not-found", "Not found", what)


def first_line(exc: BaseException) -> str:
    """An error in one line: the driver's own error where SQLAlchemy wraps one, the first
    line of its message (psycopg's run to three, SQLAlchemy adds the statement)."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of these refusals."""
    return {
        status: {
            "model": ProblemDetails,
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
        }
        for status in statuses
    }


def _response(problem: Problem) -> JSONResponse:
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


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return _response(exc)


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequest)
    # The producer's own wording: a refused field's, or an idempotency key's reused with
    # other parameters, which names each field that differs.
    return _response(
        Problem(422, "invalid-request", "Invalid request", str(exc), errors=list(exc.problems))
    )


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
        first_line(exc),
    )
    return _response(
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
    return _response(invalid(problems))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    return _response(
        Problem(
            exc.status_code,
            phrase.lower().replace(" ", "-"),
            phrase,
            str(exc.detail),
            headers=exc.headers,
        )
    )


def add_handlers(app: FastAPI) -> None:
    """Answer every refusal the app meets as a problem."""
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(InvalidRequest, _on_invalid)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    for error in DATABASE_DOWN:
        app.add_exception_handler(error, _on_database_down)
