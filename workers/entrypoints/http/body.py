"""What only HTTP can get wrong about a submission, refused before the producer validates it:
another media type or content coding (415), a body too large (413), a body that is no JSON
object or names a field twice, and the ``Idempotency-Key`` header given twice (422)."""

from __future__ import annotations

import collections
import json
from email.message import Message
from typing import Any

from fastapi import Request

from workers.entrypoints.http.deps import SettingsDep
from workers.entrypoints.http.problems import Problem, refused
from workers.services.producer import MAX_URL_CHARS, InvalidRequest
from workers.settings import Settings

__all__ = ["KEY_HEADER", "body_fields", "idempotency_key", "max_body_bytes"]

KEY_HEADER = "Idempotency-Key"


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
        raise refused("body", f"names {', '.join(map(ascii, repeated))} more than once")
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
        raise refused("body", f"is not JSON: {exc}") from None
    except RecursionError:
        raise refused("body", "is nested too deeply") from None
    except ValueError:
        raise refused("body", "holds a number with too many digits") from None
    if not isinstance(value, dict):
        raise refused("body", "must be a JSON object")
    return value


async def body_fields(request: Request, settings: SettingsDep) -> dict[str, Any]:
    """The request's JSON object, not yet validated."""
    _require_json(request)
    return _parse_object(await _read_body(request, max_body_bytes(settings)))


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header's key, if one was sent."""
    values = request.headers.getlist(KEY_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise refused("idempotency_key", f"the {KEY_HEADER} header is given more than once")
    # Starlette decodes header bytes as latin-1; clients send UTF-8, so the bytes are
    # recovered and decoded as such ("clé-1" stays "clé-1"). Undecodable bytes become lone
    # surrogates, which the producer refuses as it refuses them from the CLI.
    return values[0].encode("latin-1").decode("utf-8", "surrogateescape")
