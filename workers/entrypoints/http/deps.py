"""The routes' typed dependencies: the settings (``SettingsDep``), a database session that
commits when the route returns (``SessionDep``), and who is asking (``CallerDep``).

Auth: API keys (``workers.services.keys``), sent as ``Authorization: Bearer <key>`` or
``X-API-Key``. They are required unless ``T2IROUTE_API_AUTH`` says ``off``, or says ``auto``
(the default) and ``t2iroute api`` listens on loopback, as Flower's basic auth is. A key
sees, cancels and lists only the requests it made, unless it is an admin key; another key's
request is "not found" (404), so that a key learns nothing of what others asked. Where keys
are not required, a request without one sees everything, and one with a key is still held
to it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from db import queries
from db.models import GenerationRequest
from db.session import session_scope
from workers.entrypoints.http.problems import Problem, not_found
from workers.services import keys
from workers.services.keys import Caller
from workers.settings import Settings, get_settings

__all__ = [
    "CallerDep",
    "SessionDep",
    "SettingsDep",
    "caller",
    "keys_required_at",
    "visible",
]

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

SettingsDep = Annotated[Settings, Depends(get_settings)]


def session(settings: SettingsDep) -> Iterator[Session]:
    """One session for the route, committed when it returns and rolled back when it raises,
    before the answer goes out (so that a failed commit is the answer)."""
    with session_scope(settings.database_url) as opened:
        yield opened


SessionDep = Annotated[Session, Depends(session, scope="function")]

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
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_key_header)],
) -> Caller:
    """Who is asking: the live API key sent, or nobody where keys are not required. The key
    is looked up in a session of its own, closed at once: a submission holds none open while
    the producer writes."""
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
    with session_scope(settings.database_url) as lookup:
        row = keys.authenticate(lookup, sent.pop())
    if row is None:
        raise _unauthorized("the API key is unknown or revoked")
    return Caller(key_id=row.id, name=row.name, sees_all=row.is_admin)


CallerDep = Annotated[Caller, Depends(caller)]


def visible(session: Session, request_id: str, who: Caller) -> GenerationRequest:
    """The request, if it exists and ``who`` may see it; a 404 problem otherwise."""
    try:
        canonical = str(uuid.UUID(request_id)) == request_id
    except ValueError:
        canonical = False
    row = queries.get_request(session, request_id) if canonical else None
    if row is None or not who.may_see(row.api_key_id):
        raise not_found(f"no request {request_id!a}")
    return row
