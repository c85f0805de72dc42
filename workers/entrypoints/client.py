"""The t2iroute HTTP API from Python: a sync ``Client`` and an ``AsyncClient`` on httpx.

Both have the same methods (the async ones awaited): ``submit``, ``get``, ``wait``,
``image``, ``save_image``, ``list``, ``cancel`` and ``budget``, and one implementation of
what they do: each call is a flow (``_Flow``) that yields what to send or how long to sleep,
and each client only does the I/O, as httpx's auth flows serve its two clients. Results are
typed, as the API's own models (``workers.schemas``); every refusal, and every failure to get
an answer, is raised as one exception type, ``APIError``, carrying the RFC 9457 problem details
the API sent (status, title, detail, the offending field).

Retries. A connection error, a 5xx answer or a 429 is retried with exponential backoff and
jitter for up to 30 s (``RetryPolicy``): long enough for an ordinary restart of the API. A
``Retry-After`` the server sends (seconds or an HTTP date) is waited out instead. ``submit``
always sends an ``Idempotency-Key`` (a new UUID when the caller gives none) and re-sends the
same key on every retry, so a request whose answer was lost on the way back is found again,
not made twice.

Example::

    from workers.entrypoints.client import Client

    with Client("http://127.0.0.1:8000", api_key="t2i_...") as client:
        submitted = client.submit("a lighthouse in a storm", seed=7, metadata={"order": 17})
        request = client.wait(submitted.id, timeout=120)
        if request.status == "done":
            client.save_image(request.id, "lighthouse.png")
        for earlier in client.list(status="failed"):
            print(earlier.id, earlier.failure_reason)

And with asyncio::

    from workers.entrypoints.client import AsyncClient

    async with AsyncClient("http://127.0.0.1:8000", api_key="t2i_...") as client:
        submitted = await client.submit("a lighthouse in a storm")
        request = await client.wait(submitted.id)
        png = await client.image(request.id)
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from workers.schemas import (
    FINAL_STATES,
    Accepted,
    BudgetView,
    DecisionView,
    GenerationView,
    QualityView,
    RequestPage,
    RequestSummary,
    RequestView,
    StepView,
)

__all__ = [
    "FINAL_STATES",
    "APIError",
    "AsyncClient",
    "Budget",
    "Client",
    "Decision",
    "Generation",
    "ListFilters",
    "Page",
    "Quality",
    "RequestInfo",
    "RequestSummary",
    "RetryPolicy",
    "Stage",
    "SubmitOptions",
    "Submitted",
    "WaitTimeout",
]

KEY_HEADER = "Idempotency-Key"
USER_AGENT = "t2iroute-client/1"


# --- results ---------------------------------------------------------------------------------

#: Where a request stands (``GET /v1/requests/{id}``); ``final`` once it is done, failed or
#: cancelled.
RequestInfo = RequestView
#: One step of a request (``route``, ``generate:TIER``, ``score:TIER``) and its timings.
Stage = StepView
#: What the router decided and what the budget keeper granted.
Decision = DecisionView
#: An image's quality, metric by metric, and their mean.
Quality = QualityView
#: One image made for the request: tier, model, latency, where the API serves it.
Generation = GenerationView
#: One page of a listing, newest first, and the cursor of the next (None on the last).
Page = RequestPage
#: ``GET /v1/budget``: the keeper's buckets now, and what the budget paid for lately.
Budget = BudgetView


class Submitted(Accepted):
    """A submitted request. ``created`` is false when the idempotency key named a request
    made before (a retry); ``idempotency_key`` is the key sent, the caller's or a new one."""

    idempotency_key: str


# --- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """Everything the client raises: a refusal or failure the API answered (its RFC 9457
    problem details), or no answer at all (``status`` None: the connection failed on every
    try, or ``wait`` ran out of time).

    ``field`` is the first offending field the API named, ``errors`` all of them as
    ``{"field": ..., "detail": ...}``."""

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        type: str | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.type = type
        self.errors = errors or []
        where = f" ({field})" if field else ""
        super().__init__(f"{status or 'no answer'} {title}{where}: {detail}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        """The problem details of an error response; the status line and text otherwise
        (a proxy's HTML page, say)."""
        try:
            problem = response.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            return cls(response.status_code, response.reason_phrase, response.text[:500])
        errors = [e for e in problem.get("errors") or [] if isinstance(e, dict)]
        detail = problem.get("detail")
        return cls(
            response.status_code,
            str(problem.get("title") or response.reason_phrase),
            detail if isinstance(detail, str) else str(detail or ""),
            field=next((str(e["field"]) for e in errors if e.get("field")), None),
            type=problem.get("type"),
            errors=errors,
        )


class WaitTimeout(APIError, TimeoutError):
    """``wait`` ran out of time; ``last`` is the request as last seen."""

    def __init__(self, request_id: str, timeout: float, last: RequestInfo) -> None:
        super().__init__(
            None,
            "Timed out",
            f"request {request_id} still {last.status} after {timeout:g} s",
        )
        self.last = last


# --- retries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How a call is retried after a connection error, a 5xx answer or a 429: for up to
    ``window`` seconds after its first try (30 by default: an API restarted under load was
    down for 3), in at most ``attempts`` tries when that is given. The wait before retry n is
    drawn between half and all of ``backoff * 2**(n-1)`` seconds, at most ``max_backoff``;
    jitter keeps many clients that failed together from coming back together. A
    ``Retry-After`` the server sends (delta-seconds or an HTTP date) is waited out: the wait
    is the longer of it and the backoff's; one that ends past the window gives up at once,
    with the server's answer."""

    attempts: int | None = None
    backoff: float = 0.5
    max_backoff: float = 5.0
    window: float = 30.0

    def delay(self, retry: int) -> float:
        """The backoff's wait before retry ``retry`` (1 for the first)."""
        step = min(self.max_backoff, self.backoff * 2.0 ** (retry - 1))
        return random.uniform(step / 2, step)


def _retry_after(response: httpx.Response | None) -> float | None:
    """The seconds a response's ``Retry-After`` asks for (RFC 9110, 10.2.3: delta-seconds
    or an HTTP date), or None where it has none that reads as either."""
    value = None if response is None else response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as an HTTP date always is
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _retryable(response: httpx.Response) -> bool:
    return response.status_code == 429 or response.status_code >= 500


class _Retries:
    """One call's retries under a policy: how long to wait after each failed try, and when
    to stop."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.tries = 0
        self._deadline = time.monotonic() + policy.window

    def wait(self, response: httpx.Response | None = None) -> float | None:
        """Seconds to wait before trying again after a try that failed (with ``response``, or
        None for no answer); None to give up."""
        self.tries += 1
        if self.policy.attempts is not None and self.tries >= self.policy.attempts:
            return None
        left = self._deadline - time.monotonic()
        stated = _retry_after(response)
        # Sooner than the server asked would only be refused again.
        if left <= 0 or (stated is not None and stated > left):
            return None
        return min(max(stated or 0.0, self.policy.delay(self.tries)), left)


@dataclass(frozen=True)
class _Call:
    """One API call, as both clients send it."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """What httpx's ``request`` takes beside the method and the path."""
        return {"params": self.params, "json": self.json, "headers": self.headers}


def _no_answer(call: _Call, exc: httpx.TransportError, attempts: int) -> APIError:
    return APIError(
        None,
        "No answer",
        f"{call.method} {call.path}: {type(exc).__name__}: {exc} (after {attempts} tries)",
    )


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    raise APIError.from_response(response)


# --- the calls, shared by both clients --------------------------------------------------------

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: A call's logic without its I/O, driven by a client's ``_run``: it yields a ``_Call`` to
#: send (and is given the response, or has the transport's error thrown in) or the seconds to
#: sleep (and is given None), and returns the result.
_Flow = Generator[_Call | float, httpx.Response | None, T]


def _parse(model: type[M], response: httpx.Response) -> M:
    return model.model_validate(response.json())


def _request_path(request_id: str, suffix: str = "") -> str:
    # A request id is a UUID; quoting keeps any other text inside its path segment.
    return f"/v1/requests/{quote(request_id, safe='')}{suffix}"


class SubmitOptions(TypedDict, total=False):
    """What ``submit`` takes beside the prompt; an option left out takes the server's
    default."""

    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float
    #: The same key again gives the same request (with the same parameters); without one a
    #: new UUID is made, and every retry re-sends it.
    idempotency_key: str
    #: An http(s) URL the outcome is POSTed to when the request ends, signed
    #: (``workers.stages.callbacks.verify_signature``).
    callback_url: str
    #: A JSON object of the caller's, handed back with the request and in its callback.
    metadata: dict[str, Any]


class ListFilters(TypedDict, total=False):
    """Which requests ``list`` and ``page`` return (only the caller's own, unless its key is
    an admin key), and how many a page holds."""

    #: ``queued``, ``routed``, ``done``, ``failed`` or ``cancelled``.
    status: str
    #: Only requests routed to this tier.
    tier: str
    #: Made at or after this moment (a timezone-aware datetime).
    created_after: datetime
    #: Made before this moment.
    created_before: datetime
    #: The request made with this key.
    idempotency_key: str
    #: Requests per page, at most 200 (the server's default 50).
    page_size: int


def _list_params(filters: ListFilters) -> dict[str, str]:
    after, before = filters.get("created_after"), filters.get("created_before")
    size = filters.get("page_size")
    params = {
        "status": filters.get("status"),
        "tier": filters.get("tier"),
        "created_after": None if after is None else after.isoformat(),
        "created_before": None if before is None else before.isoformat(),
        "idempotency_key": filters.get("idempotency_key"),
        "limit": None if size is None else str(size),
    }
    return {name: value for name, value in params.items() if value is not None}


@dataclass
class _Polling:
    """``wait``'s schedule: poll every ``interval`` seconds, growing by half each time up to
    ``max_interval``, until ``timeout`` has passed."""

    timeout: float
    interval: float
    max_interval: float
    deadline: float = 0.0

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def next_sleep(self) -> float | None:
        """Seconds to sleep before the next poll, or None when time is up."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        sleep = min(self.interval, left)
        self.interval = min(self.interval * 1.5, self.max_interval)
        return sleep


class _BaseClient:
    """What ``Client`` and ``AsyncClient`` share: the policy and headers, and every call as a
    flow; they differ only in how they send and sleep."""

    def __init__(
        self, base_url: str, api_key: str | None, timeout: float, retry: RetryPolicy
    ) -> None:
        if retry.attempts is not None and retry.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")
        if retry.window < 0:
            raise ValueError("a retry policy's window is no negative time")
        self.retry = retry
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        #: What the httpx client of either kind is made with, beside its transport.
        self._http_options: dict[str, Any] = {
            "base_url": base_url,
            "headers": self._headers,
            "timeout": timeout,
            "follow_redirects": False,
        }

    def _exchange(self, call: _Call) -> _Flow[httpx.Response]:
        """Send a call, retrying connection errors and 5xx and 429 answers; the answer,
        checked."""
        retries = _Retries(self.retry)
        while True:
            try:
                response = yield call
            except httpx.TransportError as exc:
                wait = retries.wait()
                if wait is None:
                    raise _no_answer(call, exc, retries.tries) from exc
                yield wait
                continue
            assert response is not None
            wait = retries.wait(response) if _retryable(response) else None
            if wait is None:
                return _checked(response)
            yield wait

    def _submit(self, prompt: str, options: SubmitOptions) -> _Flow[Submitted]:
        fields: dict[str, Any] = dict(options)
        given = fields.pop("idempotency_key", None)
        key = given if given is not None else str(uuid.uuid4())
        body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        # UTF-8 bytes: httpx would encode a str header as ASCII, and the API reads UTF-8.
        headers = {KEY_HEADER.encode(): key.encode("utf-8")}
        response = yield from self._exchange(
            _Call("POST", "/v1/requests", json=body, headers=headers)
        )
        return Submitted.model_validate({**response.json(), "idempotency_key": key})

    def _get(self, request_id: str) -> _Flow[RequestInfo]:
        response = yield from self._exchange(_Call("GET", _request_path(request_id)))
        return _parse(RequestInfo, response)

    def _wait(
        self, request_id: str, timeout: float, poll_interval: float, max_poll_interval: float
    ) -> _Flow[RequestInfo]:
        polling = _Polling(timeout, poll_interval, max_poll_interval)
        while True:
            request = yield from self._get(request_id)
            if request.final:
                return request
            sleep = polling.next_sleep()
            if sleep is None:
                raise WaitTimeout(request_id, timeout, request)
            yield sleep

    def _image(self, request_id: str, tier: str | None) -> _Flow[bytes]:
        params = {} if tier is None else {"tier": tier}
        call = _Call("GET", _request_path(request_id, "/image"), params=params)
        return (yield from self._exchange(call)).content

    def _page(self, cursor: str | None, params: dict[str, str]) -> _Flow[Page]:
        if cursor is not None:
            params = {**params, "cursor": cursor}
        response = yield from self._exchange(_Call("GET", "/v1/requests", params=params))
        return _parse(Page, response)

    def _cancel(self, request_id: str) -> _Flow[RequestInfo]:
        response = yield from self._exchange(_Call("POST", _request_path(request_id, "/cancel")))
        return _parse(RequestInfo, response)

    def _budget(self, window_minutes: int) -> _Flow[Budget]:
        call = _Call("GET", "/v1/budget", params={"window_minutes": str(window_minutes)})
        return _parse(Budget, (yield from self._exchange(call)))


def _step(flow: _Flow[T], outcome: httpx.Response | httpx.TransportError | None) -> _Call | float:
    """The flow's next step, given what the last one came to; StopIteration at its end."""
    if isinstance(outcome, httpx.TransportError):
        return flow.throw(outcome)
    return flow.send(outcome)


# --- the sync client -------------------------------------------------------------------------


class Client(_BaseClient):
    """The API over blocking HTTP.

    :param base_url: where the API listens, e.g. ``http://127.0.0.1:8000``.
    :param api_key: sent as ``Authorization: Bearer <key>`` (``t2iroute keys create``).
    :param timeout: seconds for each of connect, read, write and pool.
    :param retry: retries after connection errors and 5xx and 429 answers (``RetryPolicy``:
        by default for up to 30 s, honouring ``Retry-After``).
    :param transport: an httpx transport (``httpx.MockTransport`` in a test, a proxy, ...).

    Use it as a context manager, or call ``close()``::

        with Client("http://127.0.0.1:8000") as client:
            print(client.get("0b5c...").status)
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retry or RetryPolicy())
        self._http = httpx.Client(transport=transport, **self._http_options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, flow: _Flow[T]) -> T:
        """Drive a call's flow: send what it sends, sleep what it sleeps; its result."""
        outcome: httpx.Response | httpx.TransportError | None = None
        while True:
            try:
                step = _step(flow, outcome)
            except StopIteration as done:
                return done.value
            if isinstance(step, _Call):
                try:
                    outcome = self._http.request(step.method, step.path, **step.options())
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                time.sleep(step)
                outcome = None

    def submit(self, prompt: str, **options: Unpack[SubmitOptions]) -> Submitted:
        """Submit a prompt with its ``SubmitOptions``; unstated ones take the server's
        defaults. ``client.submit("a red bicycle", seed=3).id`` is the new request's id."""
        return self._run(self._submit(prompt, options))

    def get(self, request_id: str) -> RequestInfo:
        """Where a request stands: ``client.get(id).status``."""
        return self._run(self._get(request_id))

    def wait(
        self,
        request_id: str,
        *,
        timeout: float = 300.0,
        poll_interval: float = 0.25,
        max_poll_interval: float = 5.0,
    ) -> RequestInfo:
        """Poll until the request is done, failed or cancelled, and return it; the polls
        start ``poll_interval`` apart and spread out to ``max_poll_interval``. Raises
        ``WaitTimeout`` (an ``APIError``) after ``timeout`` seconds.

        ``client.wait(client.submit("a cat").id, timeout=60).answer_tier``"""
        return self._run(self._wait(request_id, timeout, poll_interval, max_poll_interval))

    def image(self, request_id: str, *, tier: str | None = None) -> bytes:
        """The answer's image (PNG bytes), or the image made on ``tier`` (an explored one).
        Before the request is done the API answers 404 (not there yet); for a request that
        failed or was cancelled, 409 (there never will be one): both raised as ``APIError``."""
        return self._run(self._image(request_id, tier))

    def save_image(self, request_id: str, path: str | Path, *, tier: str | None = None) -> Path:
        """Write the image (``image``) to ``path``; the path."""
        target = Path(path)
        target.write_bytes(self.image(request_id, tier=tier))
        return target

    def page(self, *, cursor: str | None = None, **filters: Unpack[ListFilters]) -> Page:
        """One page of the listing, newest first; ``cursor`` is the previous page's ``next``."""
        return self._run(self._page(cursor, _list_params(filters)))

    def list(self, **filters: Unpack[ListFilters]) -> Iterator[RequestSummary]:
        """Every request that matches the ``ListFilters``, newest first, fetched a page at a
        time by following each page's cursor.

        ``[r.id for r in client.list(status="failed", created_after=yesterday)]``"""
        params = _list_params(filters)
        page = self._run(self._page(None, params))
        yield from page.items
        while page.next is not None:
            page = self._run(self._page(page.next, params))
            yield from page.items

    def cancel(self, request_id: str) -> RequestInfo:
        """Cancel a request that has not started generating; the request after it. A
        request already generating, or ended otherwise, is refused (``APIError``, 409)."""
        return self._run(self._cancel(request_id))

    def budget(self, *, window_minutes: int = 60) -> Budget:
        """The budget keeper's buckets and the spend of the last ``window_minutes`` against
        the budget, with per-tier counts: ``client.budget().spent``."""
        return self._run(self._budget(window_minutes))


# --- the async client ------------------------------------------------------------------------


class AsyncClient(_BaseClient):
    """``Client``'s methods, awaited, on ``httpx.AsyncClient``; ``list`` is an async
    iterator. The parameters are ``Client``'s (``transport`` an ``httpx.AsyncBaseTransport``).

    ::

        async with AsyncClient("http://127.0.0.1:8000", api_key=key) as client:
            ids = [(await client.submit(p)).id for p in prompts]
            done = await asyncio.gather(*(client.wait(i) for i in ids))
            async for request in client.list(status="done"):
                ...
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, retry or RetryPolicy())
        self._http = httpx.AsyncClient(transport=transport, **self._http_options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, flow: _Flow[T]) -> T:
        """``Client._run``, awaiting the sends and the sleeps."""
        outcome: httpx.Response | httpx.TransportError | None = None
        while True:
            try:
                step = _step(flow, outcome)
            except StopIteration as done:
                return done.value
            if isinstance(step, _Call):
                try:
                    outcome = await self._http.request(step.method, step.path, **step.options())
                except httpx.TransportError as exc:
                    outcome = exc
            else:
                await asyncio.sleep(step)
                outcome = None

    async def submit(self, prompt: str, **options: Unpack[SubmitOptions]) -> Submitted:
        """``Client.submit``."""
        return await self._run(self._submit(prompt, options))

    async def get(self, request_id: str) -> RequestInfo:
        """``Client.get``."""
        return await self._run(self._get(request_id))

    async def wait(
        self,
        request_id: str,
        *,
        timeout: float = 300.0,
        poll_interval: float = 0.25,
        max_poll_interval: float = 5.0,
    ) -> RequestInfo:
        """``Client.wait``."""
        return await self._run(self._wait(request_id, timeout, poll_interval, max_poll_interval))

    async def image(self, request_id: str, *, tier: str | None = None) -> bytes:
        """``Client.image``."""
        return await self._run(self._image(request_id, tier))

    async def save_image(
        self, request_id: str, path: str | Path, *, tier: str | None = None
    ) -> Path:
        """``Client.save_image``."""
        target = Path(path)
        target.write_bytes(await self.image(request_id, tier=tier))
        return target

    async def page(self, *, cursor: str | None = None, **filters: Unpack[ListFilters]) -> Page:
        """``Client.page``."""
        return await self._run(self._page(cursor, _list_params(filters)))

    async def list(self, **filters: Unpack[ListFilters]) -> AsyncIterator[RequestSummary]:
        """``Client.list``, as an async iterator: ``async for r in client.list(): ...``"""
        params = _list_params(filters)
        page = await self._run(self._page(None, params))
        for item in page.items:
            yield item
        while page.next is not None:
            page = await self._run(self._page(page.next, params))
            for item in page.items:
                yield item

    async def cancel(self, request_id: str) -> RequestInfo:
        """``Client.cancel``."""
        return await self._run(self._cancel(request_id))

    async def budget(self, *, window_minutes: int = 60) -> Budget:
        """``Client.budget``."""
        return await self._run(self._budget(window_minutes))
