"""Bad input, everywhere alike: one table of hostile (and a few valid) inputs, each sent
through the Python producer, the HTTP API and the CLI wherever that channel can carry it.

Every channel that carries a row gives the same verdict; where the producer's validation
refuses, every channel gives the same message, word for word; a refused row leaves no row in
generation_requests and no message on the route queue. A channel's own refusals (HTTP's 413
and 415, a typer usage error) are checked as such. Rows say what each channel can carry: an
argv holds no NUL and at most 128 KiB per argument, an HTTP header value no control character
and no surrounding space, a Python string no undecodable byte (PEP 383 carries those as lone
surrogates, on the command line and in the API's body and header alike)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select
from typer.testing import CliRunner

from db.models import GenerationRequest
from db.session import session_scope
from workers.entrypoints.cli import main as cli
from workers.entrypoints.http.app import create_app
from workers.services.producer import (
    MAX_KEY_CHARS,
    MAX_METADATA_DEPTH,
    MAX_SEED,
    MAX_URL_CHARS,
    InvalidRequest,
    parse_request,
    submit,
)
from workers.settings import Settings, get_settings

pytestmark = pytest.mark.integration

LIMITS = get_settings()
SIDE = f"must be a multiple of 8 between {LIMITS.min_side} and {LIMITS.max_side}"


@dataclass(frozen=True)
class Carried:
    """The channel carries the row to the producer's validation."""


@dataclass(frozen=True)
class Absent:
    """The channel cannot express the row."""

    why: str


@dataclass(frozen=True)
class HttpRefusal:
    """HTTP refuses the row itself, before the producer, with this status and problem type."""

    status: int
    kind: str


@dataclass(frozen=True)
class UsageError:
    """Typer refuses the row itself (exit status 2), before the producer."""


CARRIED = Carried()
#: A row's prompt when the request has none.
OMITTED = object()


@dataclass(frozen=True)
class RawHttp:
    """A request sent as it is, instead of the JSON of the row's prompt and options."""

    body: bytes
    content_type: str | None = "application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    chunked: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    prompt: Any = "a cat"
    #: The Python producer's keyword arguments, idempotency_key included.
    options: Mapping[str, Any] = field(default_factory=dict)
    #: The canonical refusal wherever validation refuses the row; None: accepted.
    message: str | None = None
    python: Carried | Absent = CARRIED
    http: Carried | Absent | HttpRefusal = CARRIED
    cli: Carried | Absent | UsageError = CARRIED
    raw_http: RawHttp | None = None
    #: Send the derived body with every non-ASCII character escaped (backslash-u), the only
    #: JSON form of a lone surrogate.
    json_escapes: bool = False

    @property
    def refused(self) -> bool:
        return self.message is not None or isinstance(self.http, HttpRefusal)


NO_NUL = Absent("an argv string ends at NUL")
NO_SURROGATE = Absent("argv and header bytes never decode to a surrogate outside U+DC80..DCFF")
HEADER_GRAMMAR = Absent("an HTTP field value holds no control character and no surrounding space")
PYTHON_ONLY_TYPES = Absent("the command line has only strings and typed options")
HTTP_ONLY = Absent("only an HTTP request can have this form")
#: The API with keys not required: what is checked here is validation, alike everywhere.
APP = create_app(require_keys=False)


def _invalid(field_name: str, why: str) -> str:
    return f"invalid request: {field_name}: {why}"


def _url(url: object, message: str | None = None, **channels: Any) -> Case:
    """A row with this callback URL, refused with ``message`` (None: accepted)."""
    return Case(
        f"callback URL {url!a}"[:60],
        options={"callback_url": url},
        message=None if message is None else _invalid("callback_url", message),
        **channels,
    )


def _internal(url: str, address: str) -> Case:
    """A row with a callback URL that points at an internal address, in whatever spelling;
    the refusal names the address as Python writes it."""
    named = ipaddress.ip_address(address)
    return _url(
        url, f"must not point at a loopback, private or otherwise internal address ({named})"
    )


def _internal_name(url: str, host: str) -> Case:
    """A row with a callback URL that names a host only meaningful inside a network."""
    return _url(url, f"must not point at a local or internal host name ({host})")


def _metadata(name: str, metadata: object, message: str | None = None, **channels: Any) -> Case:
    """A row with this metadata, refused with ``message`` (None: accepted)."""
    return Case(
        name,
        options={"metadata": metadata},
        message=None if message is None else _invalid("metadata", message),
        **channels,
    )


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _too_long(chars: int) -> str:
    return _invalid(
        "prompt", f"prompt has {chars} characters; the limit is {LIMITS.max_prompt_chars}"
    )


def _http_only(name: str, raw: RawHttp, outcome: str | HttpRefusal) -> Case:
    """A row only HTTP can send: refused by the producer's rules with the message ``outcome``,
    or by HTTP itself."""
    if isinstance(outcome, HttpRefusal):
        return Case(name, python=HTTP_ONLY, http=outcome, cli=HTTP_ONLY, raw_http=raw)
    return Case(name, message=outcome, python=HTTP_ONLY, cli=HTTP_ONLY, raw_http=raw)


EMPTY = _invalid("prompt", "prompt is empty")
CONTROL = _invalid("prompt", "prompt contains control characters")
NOT_UTF8 = _invalid("prompt", "prompt is not valid UTF-8 text")
NOT_STRING = _invalid("prompt", "Input should be a valid string")
NOT_INTEGER = "Input should be a valid integer"
NOT_NUMBER = "Input should be a valid number"
NOT_FINITE = _invalid("guidance_scale", "Input should be a finite number")
KEY_NOT_PRINTABLE = _invalid("idempotency_key", "must be printable text")
NOT_JSON = "is not JSON: Expecting value: line 1 column 1 (char 0)"
NOT_OBJECT = _invalid("body", "must be a JSON object")
TOO_LARGE = HttpRefusal(413, "body-too-large")
UNSUPPORTED = HttpRefusal(415, "unsupported-media-type")
OK = b'{"prompt": "a cat"}'

HOSTILE = [
    # Prompts with nothing to draw.
    Case("empty prompt", "", message=EMPTY),
    Case("whitespace prompt", " \t\n\u3000 ", message=EMPTY),
    Case("zero-width spaces", "\u200b\u200b\u200b", message=EMPTY),
    Case("byte order mark", "\ufeff", message=EMPTY),
    Case("invisible mix", "\u2060\u200d \ufeff\u3164\u180e", message=EMPTY),
    # Control characters and broken text.
    Case("NUL", "a\x00cat", message=CONTROL, cli=NO_NUL),
    Case("ANSI escape", "\x1b[2Ja cat", message=CONTROL),
    Case("carriage return inside", "a\rcat", message=CONTROL),
    Case("DEL", "a cat\x7f!", message=CONTROL),
    Case("C1 control", "a\x9bcat", message=CONTROL),
    Case("invalid UTF-8", "a \udcff cat", message=NOT_UTF8),
    Case("lone surrogate", "a \ud800 cat", message=NOT_UTF8, cli=NO_SURROGATE, json_escapes=True),
    # Sizes.
    Case(
        "one character over",
        "x" * (LIMITS.max_prompt_chars + 1),
        message=_too_long(LIMITS.max_prompt_chars + 1),
    ),
    Case("100 kB prompt", "x" * 100_000, message=_too_long(100_000), http=TOO_LARGE),
    Case(
        "1 MB prompt",
        "x" * 2**20,
        message=_too_long(2**20),
        http=TOO_LARGE,
        cli=Absent("one argv string holds at most 128 KiB"),
    ),
    _http_only("1 MB chunked body", RawHttp(b" " * 2**20, chunked=True), TOO_LARGE),
    # A prompt of another type.
    Case("number prompt", 42, message=NOT_STRING, cli=PYTHON_ONLY_TYPES),
    Case("null prompt", None, message=NOT_STRING, cli=PYTHON_ONLY_TYPES),
    Case("nested JSON prompt", {"text": "a cat"}, message=NOT_STRING, cli=PYTHON_ONLY_TYPES),
    Case("list prompt", ["a", "cat"], message=NOT_STRING, cli=PYTHON_ONLY_TYPES),
    # Numbers of the wrong type.
    Case(
        "string steps",
        options={"steps": "7"},
        message=_invalid("steps", NOT_INTEGER),
        cli=PYTHON_ONLY_TYPES,
    ),
    Case(
        "boolean width",
        options={"width": True},
        message=_invalid("width", NOT_INTEGER),
        cli=UsageError(),
    ),
    Case(
        "boolean guidance",
        options={"guidance_scale": False},
        message=_invalid("guidance_scale", NOT_NUMBER),
        cli=UsageError(),
    ),
    Case(
        "string guidance",
        options={"guidance_scale": "7.5"},
        message=_invalid("guidance_scale", NOT_NUMBER),
        cli=PYTHON_ONLY_TYPES,
    ),
    Case(
        "fractional steps",
        options={"steps": 7.5},
        message=_invalid("steps", NOT_INTEGER),
        cli=UsageError(),
    ),
    Case(
        "fractional width",
        options={"width": 64.5},
        message=_invalid("width", NOT_INTEGER),
        cli=UsageError(),
    ),
    Case(
        "integral float seed",
        options={"seed": 3.0},
        message=_invalid("seed", NOT_INTEGER),
        cli=Absent("an option has its declared type: typer reads the text 3.0 as the integer 3"),
    ),
    # Numbers out of range.
    Case(
        "negative seed",
        options={"seed": -1},
        message=_invalid("seed", "Input should be greater than or equal to 0"),
    ),
    Case(
        "seed over 31 bits",
        options={"seed": MAX_SEED + 1},
        message=_invalid("seed", f"Input should be less than or equal to {MAX_SEED}"),
    ),
    Case(
        "huge seed",
        options={"seed": 10**30},
        message=_invalid("seed", f"Input should be less than or equal to {MAX_SEED}"),
    ),
    Case("huge width", options={"width": 10**30}, message=_invalid("width", SIDE)),
    Case(
        "height past the limit",
        options={"height": LIMITS.max_side + 8},
        message=_invalid("height", SIDE),
    ),
    Case(
        "negative steps",
        options={"steps": -5},
        message=_invalid("steps", f"must be between 1 and {LIMITS.max_steps}"),
    ),
    Case("NaN guidance", options={"guidance_scale": float("nan")}, message=NOT_FINITE),
    Case("infinite guidance", options={"guidance_scale": float("inf")}, message=NOT_FINITE),
    Case("minus infinite guidance", options={"guidance_scale": float("-inf")}, message=NOT_FINITE),
    Case(
        "huge guidance",
        options={"guidance_scale": 1e308},
        message=_invalid("guidance_scale", "Input should be less than or equal to 50"),
    ),
    Case(
        "negative guidance",
        options={"guidance_scale": -0.5},
        message=_invalid("guidance_scale", "Input should be greater than or equal to 0"),
    ),
    _http_only(
        "number of 5000 digits",
        RawHttp(b'{"prompt": "a cat", "seed": 1' + b"0" * 4999 + b"}"),
        _invalid("body", "holds a number with too many digits"),
    ),
    # Fields nobody asked for.
    Case(
        "unknown field",
        options={"tier": "cloud"},
        message=_invalid("tier", "Extra inputs are not permitted"),
        cli=PYTHON_ONLY_TYPES,
    ),
    Case(
        "hostile field name",
        options={"\u202e\x1b": 1},
        message=_invalid("'\\u202e\\x1b'", "Extra inputs are not permitted"),
        cli=PYTHON_ONLY_TYPES,
    ),
    _http_only(
        "idempotency key in the body",
        RawHttp(b'{"prompt": "a cat", "idempotency_key": "order-17"}'),
        _invalid("idempotency_key", "belongs in the Idempotency-Key header, not the body"),
    ),
    _http_only(
        "settings in the body",
        RawHttp(b'{"prompt": "a cat", "settings": {}}'),
        _invalid("settings", "Extra inputs are not permitted"),
    ),
    Case(
        "no prompt",
        OMITTED,
        {"seed": 1},
        _invalid("prompt", "Field required"),
        python=Absent("submit() takes the prompt as a required argument"),
        cli=UsageError(),
    ),
    # Bodies that are no JSON object.
    _http_only("form body as JSON", RawHttp(b"prompt=a+cat"), _invalid("body", NOT_JSON)),
    _http_only("empty body", RawHttp(b""), _invalid("body", NOT_JSON)),
    _http_only("JSON array", RawHttp(b'["a cat"]'), NOT_OBJECT),
    _http_only("JSON string", RawHttp(b'"a cat"'), NOT_OBJECT),
    _http_only("JSON null", RawHttp(b"null"), NOT_OBJECT),
    _http_only(
        "repeated field",
        RawHttp(b'{"prompt": "a cat", "prompt": "a dog"}'),
        _invalid("body", "names 'prompt' more than once"),
    ),
    _http_only(
        "deeply nested",
        RawHttp(b"[" * 5_000 + b"]" * 5_000),
        _invalid("body", "is nested too deeply"),
    ),
    _http_only(
        "BOM before the JSON",
        RawHttp(b"\xef\xbb\xbf" + OK),
        _invalid(
            "body",
            "is not JSON: Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)",
        ),
    ),
    # Wrong content types.
    _http_only("text/plain", RawHttp(OK, content_type="text/plain"), UNSUPPORTED),
    _http_only("no content type", RawHttp(OK, content_type=None), UNSUPPORTED),
    _http_only("form content type", RawHttp(OK, "application/x-www-form-urlencoded"), UNSUPPORTED),
    _http_only("latin-1 charset", RawHttp(OK, "application/json; charset=latin-1"), UNSUPPORTED),
    _http_only("gzip coding", RawHttp(OK, headers=((b"Content-Encoding", b"gzip"),)), UNSUPPORTED),
    # Hostile idempotency keys.
    Case(
        "empty key",
        options={"idempotency_key": ""},
        message=_invalid("idempotency_key", f"must have 1 to {MAX_KEY_CHARS} characters"),
    ),
    Case(
        "key too long",
        options={"idempotency_key": "k" * (MAX_KEY_CHARS + 1)},
        message=_invalid("idempotency_key", f"must have 1 to {MAX_KEY_CHARS} characters"),
    ),
    Case(
        "key with a newline",
        options={"idempotency_key": "order\n17"},
        message=KEY_NOT_PRINTABLE,
        http=HEADER_GRAMMAR,
    ),
    Case(
        "key with NUL",
        options={"idempotency_key": "order\x0017"},
        message=KEY_NOT_PRINTABLE,
        http=HEADER_GRAMMAR,
        cli=NO_NUL,
    ),
    Case(
        "key with an escape",
        options={"idempotency_key": "\x1b[31morder"},
        message=KEY_NOT_PRINTABLE,
        http=HEADER_GRAMMAR,
    ),
    Case("key with a tab", options={"idempotency_key": "order\t17"}, message=KEY_NOT_PRINTABLE),
    Case(
        "key with a zero-width space",
        options={"idempotency_key": "order\u200b17"},
        message=KEY_NOT_PRINTABLE,
    ),
    Case(
        "key with a bidi override",
        options={"idempotency_key": "\u202eorder-17"},
        message=KEY_NOT_PRINTABLE,
    ),
    Case(
        "key with a no-break space",
        options={"idempotency_key": "order\u00a017"},
        message=KEY_NOT_PRINTABLE,
    ),
    Case(
        "key with a leading space",
        options={"idempotency_key": " order-17"},
        message=_invalid("idempotency_key", "must not begin or end with a space"),
        http=HEADER_GRAMMAR,
    ),
    Case(
        "key of invalid UTF-8",
        options={"idempotency_key": "order-\udcff"},
        message=_invalid("idempotency_key", "must be valid UTF-8 text"),
    ),
    Case(
        "key of another type",
        options={"idempotency_key": 17},
        message=_invalid("idempotency_key", "Input should be a valid string"),
        http=Absent("a header value is text"),
        cli=PYTHON_ONLY_TYPES,
    ),
    _http_only(
        "two key headers",
        RawHttp(OK, headers=((b"Idempotency-Key", b"a"), (b"Idempotency-Key", b"b"))),
        _invalid("idempotency_key", "the Idempotency-Key header is given more than once"),
    ),
    # Callback URLs.
    _url("ftp://hooks.example.com/t2i", "must be an http or https URL"),
    _url("javascript:alert(1)", "must be an http or https URL"),
    _url("hooks.example.com/t2i", "must be an http or https URL"),
    _url("http:///t2i", "must name a host"),
    _url(
        "https://user:secret@hooks.example.com/",
        "must not carry credentials (callbacks are signed instead)",
    ),
    _url("http://hooks.example.com:99999/", "is not a URL: Port out of range 0-65535"),
    _url("http://[::1/", "is not a URL: Invalid IPv6 URL"),
    _url(
        "https://hooks.exämple.com/",
        "must be printable ASCII without spaces (percent-encode the rest)",
    ),
    _url(
        "https://hooks.example.com/a b",
        "must be printable ASCII without spaces (percent-encode the rest)",
    ),
    _url(
        "https://hooks.example.com/\nX-Injected: 1",
        "must be printable ASCII without spaces (percent-encode the rest)",
    ),
    _url(
        "https://hooks.example.com/" + "a" * MAX_URL_CHARS,
        f"must have 1 to {MAX_URL_CHARS} characters",
    ),
    _url("", f"must have 1 to {MAX_URL_CHARS} characters"),
    _url("https://hooks.example.com/\udcff", "must be valid UTF-8 text", cli=NO_SURROGATE),
    _url(17, "Input should be a valid string", cli=PYTHON_ONLY_TYPES),
    # Callback URLs into the server's own network (server-side request forgery): the
    # services beside the workers, a cloud's metadata service, in every spelling of an
    # address that the resolver reads, and names that only mean something inside.
    _internal("http://127.0.0.1:6379/", "127.0.0.1"),
    _internal("https://127.0.0.1:8443/hook", "127.0.0.1"),
    _internal("http://127.0.0.1./", "127.0.0.1"),
    _internal("http://127.1/", "127.0.0.1"),
    _internal("http://2130706433/", "127.0.0.1"),
    _internal("http://0x7f000001/", "127.0.0.1"),
    _internal("http://0177.0.0.1/", "127.0.0.1"),
    _internal("http://127.000.000.001/", "127.0.0.1"),
    _internal("http://[::1]/", "::1"),
    _internal("http://[0:0:0:0:0:0:0:1]:5432/", "::1"),
    _internal("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
    _internal("http://[::127.0.0.1]/", "::127.0.0.1"),
    _internal("http://[64:ff9b::127.0.0.1]/", "64:ff9b::127.0.0.1"),
    _internal("http://[64:ff9b:1::a00:1]/", "64:ff9b:1::a00:1"),
    _internal("http://[2002:7f00:1::1]/", "2002:7f00:1::1"),
    _internal(
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "2001:0:4136:e378:8000:63bf:3fff:fdd2"
    ),
    _internal("http://0.0.0.0/", "0.0.0.0"),
    _internal("http://0/", "0.0.0.0"),
    _internal("http://[::]/", "::"),
    _internal("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    _internal("http://[fe80::1]/", "fe80::1"),
    _internal("http://10.0.0.5/", "10.0.0.5"),
    _internal("http://172.16.0.1/", "172.16.0.1"),
    _internal("http://172.31.255.254/", "172.31.255.254"),
    _internal("http://192.168.1.1/", "192.168.1.1"),
    _internal("http://[fd00::5]/", "fd00::5"),
    _internal("http://100.64.0.1/", "100.64.0.1"),
    _internal("http://224.0.0.1/", "224.0.0.1"),
    _internal("http://[ff02::1]/", "ff02::1"),
    _internal("http://240.0.0.1/", "240.0.0.1"),
    _internal("http://255.255.255.255/", "255.255.255.255"),
    _internal_name("http://localhost:5432/", "localhost"),
    _internal_name("http://LOCALHOST./", "localhost."),
    _internal_name("http://api.localhost/", "api.localhost"),
    _internal_name(
        "http://metadata.google.internal/computeMetadata/v1/", "metadata.google.internal"
    ),
    _internal_name("http://redis:6379/", "redis"),
    _internal_name("http://printer.local/", "printer.local"),
    _internal_name("http://router.home.arpa/", "router.home.arpa"),
    # Metadata.
    _metadata("metadata list", ["a", "b"], "must be a JSON object"),
    _metadata("metadata string", '{"a": 1}', "must be a JSON object"),
    _metadata("metadata NaN", {"score": float("nan")}, "holds a number that is not finite"),
    _metadata(
        "metadata too large",
        {"blob": "x" * LIMITS.max_metadata_bytes},
        f"has {LIMITS.max_metadata_bytes + 11} bytes as JSON; "
        f"the limit is {LIMITS.max_metadata_bytes}",
    ),
    _metadata(
        "metadata too deep",
        _nested(MAX_METADATA_DEPTH + 1),
        f"is nested more than {MAX_METADATA_DEPTH} deep",
    ),
    _metadata(
        "metadata lone surrogate",
        {"note": "a \ud800 b"},
        "holds text that is not valid UTF-8",
        json_escapes=True,
    ),
    _metadata(
        "metadata number name",
        {1: "a"},
        "has a name that is not text",
        http=Absent("a JSON object's names are text"),
        cli=Absent("a JSON object's names are text"),
    ),
    _metadata(
        "metadata tuple",
        {"pair": (1, 2)},
        "holds a tuple, which is no JSON value",
        http=Absent("JSON has arrays, not tuples"),
        cli=Absent("JSON has arrays, not tuples"),
    ),
    # Several faults at once: every one is named, in the same order everywhere.
    Case(
        "several faults",
        "",
        {"steps": 0, "seed": -1},
        (
            f"{EMPTY}; steps: must be between 1 and {LIMITS.max_steps}; "
            "seed: Input should be greater than or equal to 0"
        ),
    ),
]

VALID = [
    Case("plain prompt"),
    Case("accents and a symbol", "un café ☕ sous la pluie"),
    Case("emoji joined by ZWJ", "a family \U0001f469\u200d\U0001f469\u200d\U0001f467 at sea"),
    Case("leading byte order mark", "\ufeffa cat on a mat"),
    Case("prompt like an option", "--help"),
    Case("longest prompt, all astral", "\U0001d54f" * LIMITS.max_prompt_chars, json_escapes=True),
    Case(
        "bounds",
        options={
            "width": LIMITS.max_side,
            "height": LIMITS.min_side,
            "steps": 1,
            "seed": MAX_SEED,
            "guidance_scale": 50,
        },
    ),
    Case("zero seed and guidance", options={"seed": 0, "guidance_scale": 0.0}),
    Case("non-ASCII key", options={"idempotency_key": "clé-1"}),
    Case("key of another script", options={"idempotency_key": "注文-17"}),
    _url("https://hooks.example.com:8443/t2i?team=7&x=%C3%A9#frag"),
    _url("http://93.184.216.34/hook"),
    _url("https://[2606:4700::1111]:8443/hook"),
    _url("http://[::ffff:93.184.216.34]/hook"),
    _url("https://hooks.example.com./t2i"),
    _metadata("metadata nested", {"order": {"id": "A-17", "lines": [1, 2.5, True, None]}}),
    _metadata("metadata of another script", {"注文": "é ☕"}),
    _metadata("metadata at the depth limit", _nested(MAX_METADATA_DEPTH)),
]


@pytest.fixture(autouse=True, scope="module")
def _no_allowed_networks(settings: Settings) -> Iterator[None]:
    """Every channel reads the settings of an operator that allows no internal network (the
    test environment allows loopback, for its receivers). After the session's settings
    (``settings``), which keep the environment's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("T2IROUTE_CALLBACK_ALLOWED_NETWORKS", "")
        get_settings.cache_clear()
        yield
    get_settings.cache_clear()


def _rows(url: str) -> list[GenerationRequest]:
    with session_scope(url) as session:
        return list(session.scalars(select(GenerationRequest)))


@dataclass(frozen=True)
class Outcome:
    """What one channel did: the request id it gave back, or the refusal it answered."""

    request_id: str | None = None
    message: str | None = None


def _through_python(case: Case) -> Outcome:
    try:
        return Outcome(request_id=submit(case.prompt, **case.options).request_id)
    except InvalidRequest as exc:
        return Outcome(message=str(exc))


def _http_request(case: Case) -> RawHttp:
    if case.raw_http is not None:
        return case.raw_http
    stated = {"prompt": case.prompt, **case.options}
    if case.prompt is OMITTED:
        del stated["prompt"]
    key = stated.pop("idempotency_key", None)
    text = json.dumps(stated, ensure_ascii=case.json_escapes)
    # Text and keys as the bytes a client sends; a PEP 383 surrogate is the byte it stands for.
    headers = () if key is None else ((b"Idempotency-Key", key.encode("utf-8", "surrogateescape")),)
    return RawHttp(text.encode("utf-8", "surrogateescape"), headers=headers)


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 4096):
        yield body[start : start + 4096]


async def _post(raw: RawHttp) -> httpx.Response:
    headers = list(raw.headers)
    if raw.content_type is not None:
        headers.append((b"Content-Type", raw.content_type.encode()))
    # httpx's ASGI transport hands the header bytes over as they are (Starlette's TestClient
    # re-encodes them); a chunked body states no Content-Length.
    content = _chunks(raw.body) if raw.chunked else raw.body
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://t2iroute.test") as client:
        return await client.post("/v1/requests", content=content, headers=headers)


def _through_http(case: Case) -> Outcome:
    reply = asyncio.run(_post(_http_request(case)))
    if reply.status_code == 202:
        return Outcome(request_id=reply.json()["id"])
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["status"] == reply.status_code
    assert problem["title"] and problem["detail"]
    if isinstance(case.http, HttpRefusal):
        assert (reply.status_code, problem["type"]) == (
            case.http.status,
            f"urn:t2iroute:problem:{case.http.kind}",
        )
        return Outcome(message=problem["detail"])
    assert reply.status_code == 422
    assert problem["type"] == "urn:t2iroute:problem:invalid-request"
    listed = "; ".join(f"{e['field']}: {e['detail']}" for e in problem["errors"])
    assert problem["detail"] == f"invalid request: {listed}"
    return Outcome(message=problem["detail"])


def _through_cli(case: Case) -> Outcome:
    options = [
        # Metadata is JSON text on the command line, as in an HTTP body.
        f"--{name.replace('_', '-')}={json.dumps(value) if name == 'metadata' else value}"
        for name, value in case.options.items()
    ]
    # After "--" a prompt is never read as an option, whatever it starts with.
    prompt = [] if case.prompt is OMITTED else ["--", case.prompt]
    done = CliRunner().invoke(cli.app, ["submit", *options, *prompt])
    if done.exit_code == 0:
        return Outcome(request_id=done.stdout.splitlines()[0])
    assert done.exit_code == 2, done.output
    if isinstance(case.cli, UsageError):
        assert "Usage:" in done.stderr and not done.stderr.startswith("invalid request")
        return Outcome(message=done.stderr)
    assert done.stdout == ""
    return Outcome(message=done.stderr.removesuffix("\n"))


CHANNELS = {"python": _through_python, "http": _through_http, "cli": _through_cli}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in HOSTILE + VALID])
def test_every_channel_gives_the_same_verdict_and_message(
    case: Case, clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    queued_before = clean_redis.llen(settings.queue_route)
    outcomes = {
        channel: through(case)
        for channel, through in CHANNELS.items()
        if not isinstance(getattr(case, channel), Absent)
    }
    assert outcomes, "a row no channel can carry"
    verdicts = {channel: outcome.request_id is None for channel, outcome in outcomes.items()}
    assert verdicts == dict.fromkeys(outcomes, case.refused)

    validated = {
        channel: outcome.message
        for channel, outcome in outcomes.items()
        if getattr(case, channel) is CARRIED
    }
    assert validated == dict.fromkeys(validated, case.message)

    rows = _rows(clean_db)
    if case.refused:
        assert rows == []
        assert clean_redis.llen(settings.queue_route) == queued_before
        return
    assert len({row.prompt for row in rows}) == 1, "the channels stored different prompts"
    ids = {outcome.request_id for outcome in outcomes.values()}
    key = case.options.get("idempotency_key")
    # One key, one request, whichever way it came in; without a key every submission counts.
    assert len(ids) == (1 if key is not None else len(outcomes))
    assert {row.id for row in rows} == ids
    assert {row.idempotency_key for row in rows} == {key}
    assert clean_redis.llen(settings.queue_route) == queued_before + len(ids)


def test_a_non_ascii_key_round_trips_over_http(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request = RawHttp(
        b'{"prompt": "a lighthouse"}', headers=((b"Idempotency-Key", "clé-1".encode()),)
    )
    first, second = (asyncio.run(_post(request)) for _ in range(2))
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["created"] and not second.json()["created"]
    assert [row.idempotency_key for row in _rows(clean_db)] == ["clé-1"]
    assert clean_redis.llen(settings.queue_route) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/hook",
        "http://127.1:9000/hook",
        "http://[::ffff:10.1.2.3]/hook",
        "http://receiver:8080/hook",
    ],
)
def test_the_operators_allow_list_lets_its_own_receivers_through(url: str) -> None:
    allowed = Settings(callback_allowed_networks=["127.0.0.0/8", "10.0.0.0/8", "receiver"])
    assert parse_request(allowed, prompt="a cat", callback_url=url).callback_url == url
    with pytest.raises(InvalidRequest, match="callback_url: must not point at") as refused:
        parse_request(Settings(callback_allowed_networks=[]), prompt="a cat", callback_url=url)
    assert refused.value.problems[0].field == "callback_url"


def test_the_allow_list_lets_through_only_what_it_names() -> None:
    allowed = Settings(callback_allowed_networks=["127.0.0.0/8", "receiver"])
    for url, message in [
        ("http://10.0.0.5/", "internal address (10.0.0.5)"),
        ("http://[::1]/", "internal address (::1)"),
        ("http://redis:6379/", "internal host name (redis)"),
    ]:
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            parse_request(allowed, prompt="a cat", callback_url=url)
