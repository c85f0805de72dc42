"""The producer: validate at the edge, write the request, enqueue its id.

Bad input is refused here with a clear message and never enqueued. An accepted request
is durable in the database before anything is sent: if the broker is down at that moment
the request stays ``queued`` and the sweeper sends it later, so nothing is lost."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from db import queries
from db.models import GenerationRequest, Status
from db.session import session_scope
from workers import egress
from workers.app import flow
from workers.services.views import request_view
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
MAX_GUIDANCE_SCALE = 50.0
MAX_KEY_CHARS = 200
MAX_URL_CHARS = 2000
MAX_METADATA_DEPTH = 16

# Code points that show nothing yet are not format characters (Cf): the fillers and selectors
# of Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt).
_INVISIBLE_NON_FORMAT = frozenset(
    chr(code)
    for first, last in (
        (0x034F, 0x034F),
        (0x115F, 0x1160),
        (0x17B4, 0x17B5),
        (0x180B, 0x180F),
        (0x3164, 0x3164),
        (0xFE00, 0xFE0F),
        (0xFFA0, 0xFFA0),
        (0xE0100, 0xE01EF),
    )
    for code in range(first, last + 1)
)


@dataclass(frozen=True)
class FieldProblem:
    """One reason a request is refused: the field it concerns and what is wrong with it."""

    field: str
    message: str


def refusal_message(problems: Sequence[FieldProblem]) -> str:
    """The one wording of a refusal, whether the request came from Python, the CLI or HTTP."""
    return "invalid request: " + "; ".join(f"{p.field}: {p.message}" for p in problems)


class InvalidRequest(ValueError):
    """The request was refused before anything was written or enqueued. ``problems`` names
    the offending fields: those validation refused, or those that differ from the request
    first made with a reused idempotency key."""

    def __init__(self, message: str, problems: Sequence[FieldProblem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)

    @classmethod
    def from_problems(cls, problems: Sequence[FieldProblem]) -> InvalidRequest:
        return cls(refusal_message(problems), problems)


def _settings(info: ValidationInfo) -> Settings:
    """The settings the caller validates against, passed as validation context."""
    if not isinstance(info.context, dict) or "settings" not in info.context:
        raise RuntimeError("RequestSpec is validated through parse_request(settings, ...)")
    settings: Settings = info.context["settings"]
    return settings


def _is_utf8(text: str) -> bool:
    """False for text with lone surrogates: what undecodable bytes become in Python (PEP 383,
    as for a command-line argument or the HTTP body) and what no database or encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_key(key: str) -> str:
    """An idempotency key as given, or ValueError saying what is wrong with it."""
    # The length is checked here rather than as a field constraint, which would refuse
    # undecodable text with pydantic's own words before this validator could name it.
    if not _is_utf8(key):
        raise ValueError("must be valid UTF-8 text")
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise ValueError(f"must have 1 to {MAX_KEY_CHARS} characters")
    # isprintable() refuses control and format characters, line and paragraph separators
    # and every space but U+0020; letters of any script pass, and the key is kept exactly
    # as given (no normalisation), so "clé-1" is stored as "clé-1".
    if not key.isprintable():
        raise ValueError("must be printable text")
    if key != key.strip():
        raise ValueError("must not begin or end with a space")
    return key


def _strippable(char: str) -> bool:
    # Format characters at either end (a BOM, a stray zero-width space) carry nothing and
    # would make two equal prompts differ; inside a prompt they may join an emoji sequence.
    return char.isspace() or unicodedata.category(char) == "Cf"


def _strip(text: str) -> str:
    start, end = 0, len(text)
    while start < end and _strippable(text[start]):
        start += 1
    while end > start and _strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def _blank(char: str) -> bool:
    return _strippable(char) or char in _INVISIBLE_NON_FORMAT


class RequestSpec(BaseModel):
    """A request as a client states it; limits come from the settings (validation context).

    Strict: a string is no number and a boolean neither an integer nor a number, whichever
    way the request came in (Python, the command line or a JSON body)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False
    )
    idempotency_key: str | None = None
    #: Where to POST the outcome when the request ends (workers/stages/callbacks.py).
    callback_url: str | None = None
    #: The caller's own JSON object, kept and handed back with the request.
    metadata: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str, info: ValidationInfo) -> str:
        settings = _settings(info)
        if not _is_utf8(prompt):
            raise ValueError("prompt is not valid UTF-8 text")
        prompt = _strip(prompt)
        if all(_blank(c) for c in prompt):
            raise ValueError("prompt is empty")
        if len(prompt) > settings.max_prompt_chars:
            raise ValueError(
                f"prompt has {len(prompt)} characters; the limit is {settings.max_prompt_chars}"
            )
        if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in prompt):
            raise ValueError("prompt contains control characters")
        return prompt

    @field_validator("width", "height")
    @classmethod
    def _side(cls, side: int | None, info: ValidationInfo) -> int | None:
        settings = _settings(info)
        if side is None:
            return None
        if not settings.min_side <= side <= settings.max_side or side % 8:
            raise ValueError(
                f"must be a multiple of 8 between {settings.min_side} and {settings.max_side}"
            )
        return side

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        settings = _settings(info)
        if steps is not None and not 1 <= steps <= settings.max_steps:
            raise ValueError(f"must be between 1 and {settings.max_steps}")
        return steps

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, key: str | None) -> str | None:
        return None if key is None else check_key(key)

    @field_validator("callback_url")
    @classmethod
    def _callback_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:
            return None
        if not _is_utf8(url):
            raise ValueError("must be valid UTF-8 text")
        if not 1 <= len(url) <= MAX_URL_CHARS:
            raise ValueError(f"must have 1 to {MAX_URL_CHARS} characters")
        # RFC 3986: a URL is printable ASCII without spaces (an international domain name
        # in its xn-- form, other text percent-encoded).
        if not (url.isascii() and url.isprintable()) or " " in url:
            raise ValueError("must be printable ASCII without spaces (percent-encode the rest)")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises for a port that is no number or out of range)
        except ValueError as exc:
            raise ValueError(f"is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http or https URL")
        if not parts.hostname:
            raise ValueError("must name a host")
        # Credentials in a URL end up in logs; the receiver checks the signature instead.
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (callbacks are signed instead)")
        _check_callback_host(parts.hostname, _settings(info).callback_allowed)
        return url

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, metadata: Any, info: ValidationInfo) -> Any:
        settings = _settings(info)
        if metadata is None:
            return None
        if not isinstance(metadata, dict):
            raise ValueError("must be a JSON object")
        problem = _json_problem(metadata, 1)
        if problem is not None:
            raise ValueError(problem)
        size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
        if size > settings.max_metadata_bytes:
            raise ValueError(
                f"has {size} bytes as JSON; the limit is {settings.max_metadata_bytes}"
            )
        return metadata


def _check_callback_host(host: str, allowed: egress.AllowList) -> None:
    """ValueError when a callback host is plainly internal (workers/egress.py): an IP literal
    of an internal address, in any spelling, or a name only meaningful inside a network.
    Nothing is looked up here: a name is resolved and checked when the callback is sent."""
    if allowed.allows_host(host):
        return
    address = egress.literal_address(host)
    if address is not None:
        if allowed.refusal(address) is not None:
            raise ValueError(
                f"must not point at a loopback, private or otherwise internal address ({address})"
            )
    elif egress.internal_name(host):
        raise ValueError(f"must not point at a local or internal host name ({host})")


def _json_problem(value: Any, depth: int) -> str | None:
    """What keeps ``value`` from being stored as JSON and read back equal, or None: only
    objects with string names, arrays, text, finite numbers, booleans and null, nested at
    most MAX_METADATA_DEPTH deep (a Python caller could pass a tuple, NaN or a cycle)."""
    if depth > MAX_METADATA_DEPTH:
        return f"is nested more than {MAX_METADATA_DEPTH} deep"
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "holds a number that is not finite"
    if isinstance(value, str):
        return None if _is_utf8(value) else "holds text that is not valid UTF-8"
    if isinstance(value, list):
        items: list[Any] = value
    elif isinstance(value, dict):
        if not all(isinstance(name, str) for name in value):
            return "has a name that is not text"
        items = [*value, *value.values()]
    else:
        return f"holds a {type(value).__name__}, which is no JSON value"
    for item in items:
        problem = _json_problem(item, depth + 1)
        if problem is not None:
            return problem
    return None


def _field_name(loc: tuple[int | str, ...]) -> str:
    # An unknown field's name is the client's text: quoted unless it reads as a plain name,
    # so that a refusal never carries control characters into a terminal or a log.
    name = ".".join(str(part) for part in loc)
    return name if name.isidentifier() else ascii(name)


def _problems(error: ValidationError) -> list[FieldProblem]:
    return [
        FieldProblem(
            _field_name(detail["loc"]) if detail["loc"] else "request",
            # A validator's own reason reads better without pydantic's "Value error, " prefix.
            str(detail["ctx"]["error"]) if detail["type"] == "value_error" else detail["msg"],
        )
        for detail in error.errors()
    ]


def parse_request(settings: Settings, /, **fields: Any) -> RequestSpec:
    """The fields validated against the settings' limits, or InvalidRequest naming each
    offending field. ``settings`` is positional-only, so that no field can take its place."""
    try:
        return RequestSpec.model_validate(fields, context={"settings": settings})
    except ValidationError as exc:
        raise InvalidRequest.from_problems(_problems(exc)) from None


@dataclass(frozen=True)
class Submitted:
    request_id: str
    created: bool
    enqueued: bool


#: The columns a request's fields are stored in: what a retry with its key must repeat.
_COLUMNS = {
    "prompt": "prompt",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "seed": "seed",
    "guidance_scale": "guidance_scale",
    "callback_url": "callback_url",
    "metadata": "client_metadata",
}


def _row_values(spec: RequestSpec, settings: Settings, api_key_id: int | None) -> dict[str, Any]:
    """The request as stored, its defaults applied: the normalised request that a retry
    with the same idempotency key is compared with."""
    return {
        "prompt": spec.prompt,
        "width": spec.width or settings.default_width,
        "height": spec.height or settings.default_height,
        # Unstated steps stay None: each tier's own default applies when it generates.
        "steps": spec.steps,
        "seed": _seed(spec, api_key_id),
        "guidance_scale": spec.guidance_scale,
        "callback_url": spec.callback_url,
        "client_metadata": spec.metadata,
        "api_key_id": api_key_id,
    }


def _seed(spec: RequestSpec, api_key_id: int | None) -> int:
    """The stated seed; else, for a request with an idempotency key, one drawn from the key
    (and its owner), so that a retry which states no seed either asks for the same request
    and one which states another does not; else a random one."""
    if spec.seed is not None:
        return spec.seed
    if spec.idempotency_key is None:
        return secrets.randbelow(MAX_SEED)
    owner_key = f"{api_key_id}\x00{spec.idempotency_key}".encode()
    return int.from_bytes(hashlib.sha256(owner_key).digest()[:8], "big") % MAX_SEED


def submit(
    prompt: str,
    *,
    settings: Settings | None = None,
    api_key_id: int | None = None,
    **options: Any,
) -> Submitted:
    """Accept one request and enqueue it. The same idempotency key twice gives the same
    request and one job; the same key with other parameters is refused, every stored field
    compared after the defaults are applied (a field left out is its default, not "as
    before"). ``options`` are RequestSpec's fields (``callback_url`` and ``metadata``
    included); ``api_key_id`` is the HTTP API key that makes it, whose own idempotency keys
    these are."""
    settings = settings or get_settings()
    spec = parse_request(settings, prompt=prompt, **options)
    values = _row_values(spec, settings, api_key_id)
    with session_scope(settings.database_url) as session:
        request_id = None
        if spec.idempotency_key is not None:
            created = queries.insert_ignore(
                session,
                GenerationRequest,
                {
                    **values,
                    "id": _new_request_id(),
                    "idempotency_key": spec.idempotency_key,
                    "status": Status.QUEUED,
                },
            )
            row = queries.request_by_idempotency_key(session, spec.idempotency_key, api_key_id)
            assert row is not None
            if not created:
                _check_same(row, values, spec)
            request_id = row.id
        else:
            row = GenerationRequest(**values, id=_new_request_id(), status=Status.QUEUED)
            session.add(row)
            session.flush()
            created = True
            request_id = row.id
        if created:
            # Recorded with the request: if the send below fails, the sweeper sends it.
            queries.record_steps(session, request_id, [flow.ROUTE.key])
    enqueued = created and flow.send(flow.celery(), [flow.Send(request_id, flow.ROUTE)])
    return Submitted(request_id=request_id, created=created, enqueued=enqueued)


def _new_request_id() -> str:
    return str(uuid.uuid4())


#: What a refusal says of a field that differs from the request first made with its key.
DIFFERS = "differs from the request first made with this key"


def _same(stored: Any, wanted: Any) -> bool:
    # As JSON text with sorted names, so that metadata's true is not its 1, nor 1 its 1.0.
    return json.dumps(stored, sort_keys=True) == json.dumps(wanted, sort_keys=True)


def _check_same(row: GenerationRequest, values: dict[str, Any], spec: RequestSpec) -> None:
    """Refuse a retry whose normalised request is not the stored one, naming every field
    that differs (Stripe's rule: the same key with other parameters is an error)."""
    problems = [
        FieldProblem(
            name,
            DIFFERS
            if getattr(spec, name) is not None
            else f"{DIFFERS}, which stated it (a retry repeats every field)",
        )
        for name, column in _COLUMNS.items()
        if not _same(getattr(row, column), values[column])
    ]
    if problems:
        raise InvalidRequest(
            f"idempotency key {row.idempotency_key!r} was used before with other "
            f"{', '.join(p.field for p in problems)}",
            problems,
        )


def describe(request_id: str, *, settings: Settings | None = None) -> dict[str, Any] | None:
    """Where a request stands (``workers.schemas.RequestView``) as plain JSON, or None."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        request = queries.get_request(session, request_id)
        if request is None:
            return None
        return request_view(session, request).model_dump(mode="json")
