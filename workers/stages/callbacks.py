"""Callbacks: a POST to the caller's URL when its request ends (done, failed or cancelled).

How a callback is made reliable:

* **Outbox.** The transaction that ends a request writes its ``callback_deliveries`` row
  (``db.queries.transition`` calls ``record_callbacks``), so an ended request with a
  callback URL always has one, whichever worker, sweeper or API call ended it. The message
  that sends it goes after that transaction commits (a SQLAlchemy ``after_commit`` listener
  in ``workers.app.flow``: the request ends in many places, and none of them has to
  remember it).
* **One attempt per message, claimed.** The task claims the next attempt with one
  conditional UPDATE (pending, due, not held by another attempt) before it POSTs, so a
  duplicate message, or one arriving while an attempt is in flight, sends nothing.
* **Delivered once.** After a 2xx the row is ``delivered`` and no claim matches it again. A
  worker that dies between the receiver's 2xx and its record leaves the attempt unsettled,
  and it is made again once its claim has lapsed: receivers should treat ``request_id`` as
  the key of the event (each request has exactly one).
* **A few attempts per key at once** (``workers.services.callback_slots``). Callbacks have a queue
  and a worker of their own, off the maintenance queue, so that no receiver holds a sweep or
  a retraining; the worker runs many sends at once (threads). Before an attempt is claimed it
  takes a slot of its request's API key (at most ``callback_max_in_flight_per_key``), so one
  key's receiver that never answers holds that many threads and no more. A callback that
  finds its key's slots taken is no attempt: its message comes back after a short wait
  (``slot_wait``), and once it has waited ``lost_after_seconds`` the sweep re-sends it.
* **Retries** with exponential backoff and jitter, up to ``callback_max_attempts``; every
  attempt is a ``callback_attempts`` row. A retry is a message with a countdown, which never
  outlasts the broker's visibility timeout; a longer wait, or a lost message, is picked up
  by the sweep (``resend_overdue``, run by the ``sweep`` task).
* **Short and plain.** The whole exchange (connect, send, status line) must fit
  ``callback_timeout_seconds`` (5 s); the response body is not read; redirects are not
  followed (a 3xx is a failed attempt); only http and https URLs are called.
* **Internal addresses refused** (``workers.egress``). The host is resolved within the
  exchange's deadline, and the attempt fails for good when any of its addresses is loopback,
  private, link-local or otherwise internal (unless ``callback_allowed_networks`` allows
  it): a retry would only give a name that rebinds more tries. A name that does not resolve
  is a failed attempt, retried. The POST goes to an address that was checked, never to the
  name, which could resolve otherwise the second time; ``Host``, TLS's server name and the
  certificate check keep the name. Proxies of the environment are not used, so that
  nothing resolves the name again.

The signature, for receivers: the headers ``X-T2IRoute-Timestamp`` (Unix seconds) and
``X-T2IRoute-Signature: sha256=<hex>``, the HMAC-SHA256 of ``"<timestamp>.<body>"`` under
the secret of the API key that made the request (the server's ``T2IROUTE_CALLBACK_SECRET``
for a request made without one). ``verify_signature`` checks both."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session

from db import queries
from db.models import CallbackState, Status
from db.queries import CallbackClaim, CallbackOutcome
from db.session import session_scope
from workers import egress
from workers.app.flow import send_callbacks
from workers.services import callback_slots, telemetry
from workers.settings import Settings

__all__ = [
    "ATTEMPT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "backoff",
    "deliver",
    "payload",
    "resend_overdue",
    "sign",
    "slot_wait",
    "verify_signature",
]

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-T2IRoute-Timestamp"
SIGNATURE_HEADER = "X-T2IRoute-Signature"
ATTEMPT_HEADER = "X-T2IRoute-Attempt"
USER_AGENT = "t2iroute-callbacks/1"

# A retry message arrives after its countdown by the worker's clock; the claim reads the
# database's. This much earlier still counts as due, so that a small skew between the two
# does not leave a retry to the sweep.
EARLY_SECONDS = 1.0
# An attempt's claim lasts its exchange's deadline plus this, for the two short transactions
# around it: an attempt never outlives its claim, so no second one starts beside it.
CLAIM_MARGIN_SECONDS = 30.0
# Overdue callbacks re-sent per sweep; the rest wait for the next one.
SWEEP_LIMIT = 1000
# The first wait of a callback whose key's slots are all taken; it doubles at each refusal.
SLOT_WAIT_SECONDS = 0.5


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-T2IRoute-Signature`` value of a body sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    header: str,
    *,
    max_age_seconds: float | None = 300.0,
    now: float | None = None,
) -> bool:
    """True if ``header`` (the ``X-T2IRoute-Signature`` value) signs ``body`` sent at
    ``timestamp`` (the ``X-T2IRoute-Timestamp`` value) under ``secret``, and the timestamp
    is within ``max_age_seconds`` of ``now`` (this host's clock; None: no age check).

    Pass the body exactly as received, before any JSON parsing. The age check stops a
    recorded callback from being replayed later; a retry is signed afresh when it is sent.

    A receiver, with FastAPI::

        @app.post("/t2iroute")
        async def finished(request: Request) -> Response:
            body = await request.body()
            if not verify_signature(
                SECRET,
                request.headers.get("X-T2IRoute-Timestamp", ""),
                body,
                request.headers.get("X-T2IRoute-Signature", ""),
            ):
                return Response(status_code=401)
            event = json.loads(body)  # {"request_id": ..., "state": "done", ...}
            ...
            return Response(status_code=204)
    """
    if not timestamp.isascii() or not timestamp.isdigit():
        return False
    if max_age_seconds is not None:
        current = time.time() if now is None else now
        if abs(current - int(timestamp)) > max_age_seconds:
            return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def backoff(attempt: int, settings: Settings) -> float:
    """Seconds between attempt ``attempt`` (1-based) and the next: the step doubles from
    ``callback_backoff_seconds`` up to ``callback_backoff_max_seconds`` and the wait is drawn
    between half and all of it, so that the retries of many callbacks to one receiver that
    was down do not arrive together."""
    step = min(
        settings.callback_backoff_max_seconds,
        settings.callback_backoff_seconds * 2.0 ** (attempt - 1),
    )
    return random.uniform(step / 2, step)


def slot_wait(refusals: int, settings: Settings) -> float | None:
    """Seconds a callback that found its key's slots taken ``refusals`` times waits before it
    asks again: the step doubles from ``SLOT_WAIT_SECONDS`` up to ``callback_timeout_seconds``
    (within which every attempt holding a slot now has ended) and the wait is drawn between
    half and all of it. None once the steps waited add up to ``lost_after_seconds``: the
    callback is then overdue, and the sweep sends it again, so that a long wait never adds
    a second message to the one already waiting."""
    steps = [
        min(settings.callback_timeout_seconds, SLOT_WAIT_SECONDS * 2.0**n) for n in range(refusals)
    ]
    if sum(steps[:-1]) >= settings.lost_after_seconds:
        return None
    return random.uniform(steps[-1] / 2, steps[-1])


def payload(session: Session, request_id: str) -> dict[str, Any]:
    """What a callback says about an ended request. ``tier`` and ``image_url`` (a path of
    the HTTP API) are those of the answer, for a request that is done."""
    request = queries.get_request(session, request_id)
    if request is None:
        raise LookupError(request_id)
    decision = queries.get_decision(session, request_id)
    done = request.status is Status.DONE
    return {
        "request_id": request.id,
        "state": request.status.value,
        "reason": request.failure_reason,
        "tier": decision.tier if done and decision is not None else None,
        "image_url": f"/v1/requests/{request.id}/image" if done else None,
        "metadata": request.client_metadata,
        "finished_at": request.updated_at.isoformat(),
    }


@dataclass(frozen=True)
class _Letter:
    """A callback ready to POST: its body and the secret that signs it."""

    body: bytes
    secret: str


def _letter(session: Session, claim: CallbackClaim, settings: Settings) -> _Letter | str:
    """The body and secret of a claimed callback, or why it can never be sent."""
    parts = urlsplit(claim.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"callback URL {claim.url[:200]!r} is not an http or https URL"
    request = queries.get_request(session, claim.request_id)
    if request is None:
        return "the request no longer exists"
    if request.api_key_id is not None:
        secret = queries.callback_secret_of(session, request.api_key_id)
    else:
        secret = settings.callback_secret
    if not secret:
        return "no secret to sign with: set T2IROUTE_CALLBACK_SECRET"
    body = json.dumps(payload(session, claim.request_id), separators=(",", ":"))
    return _Letter(body.encode("utf-8"), secret)


@dataclass(frozen=True)
class _Exchange:
    """What the receiver answered: its status, or why there was none (``permanent``: why
    there never can be, so no retry)."""

    status_code: int | None
    error: str | None
    duration_ms: float
    permanent: bool = False


async def _checked_addresses(
    host: str, port: int, allowed: egress.AllowList
) -> list[egress.Address]:
    """``egress.checked_addresses`` in a thread of its own: the resolver cannot be
    cancelled, and a lookup that outlives the deadline must not hold the attempt (asyncio's
    default executor would: ``asyncio.run`` waits for its threads)."""
    resolver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="callback-resolve")
    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(resolver, egress.checked_addresses, host, port, allowed)
    finally:
        resolver.shutdown(wait=False)


async def _post_async(
    url: str, body: bytes, headers: dict[str, str], timeout: float, allowed: egress.AllowList
) -> int:
    """POST to an address the URL's host resolves to, every one checked first; to the next
    one when no connection to it can be made."""
    target = httpx.URL(url)
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)
    headers = {**headers, "Host": target.netloc.decode("ascii")}
    # For https the name, not the address, is TLS's server name and what the certificate
    # must match (httpcore's sni_hostname extension).
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    async with asyncio.timeout(timeout):
        *others, last = await _checked_addresses(host, port, allowed)
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False
        ) as client:

            async def post_to(address: egress.Address) -> int:
                async with client.stream(
                    "POST",
                    target.copy_with(host=str(address)),
                    content=body,
                    headers=headers,
                    extensions=extensions,
                ) as response:
                    return response.status_code

            for address in others:
                with contextlib.suppress(httpx.ConnectError):
                    return await post_to(address)
            return await post_to(last)


def _post(url: str, letter: _Letter, attempt: int, settings: Settings) -> _Exchange:
    """POST the letter once. httpx's timeouts bound each read and write, not the exchange
    (a receiver trickling its answer could hold it for long), and an attempt must end within
    its claim: the exchange, the lookup of the host included, runs under one asyncio
    deadline for the whole of it."""
    timeout = settings.callback_timeout_seconds
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(letter.secret, timestamp, letter.body),
        ATTEMPT_HEADER: str(attempt),
    }
    started = time.perf_counter()
    status_code: int | None = None
    permanent = False
    try:
        status_code = asyncio.run(
            _post_async(url, letter.body, headers, timeout, settings.callback_allowed)
        )
    except egress.InternalAddress as exc:
        error: str | None = f"refused: callback {exc}"
        permanent = True
    except UnicodeError:
        # An empty label, or one over 63 characters: no resolver takes the name, ever.
        error, permanent = "the callback host is no valid host name", True
    except TimeoutError:
        error = f"no answer within {timeout:g} s"
    except socket.gaierror as exc:
        error = f"the callback host does not resolve: {exc.strerror}"
    except (httpx.HTTPError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None if 200 <= status_code < 300 else f"HTTP {status_code}"
        if 300 <= status_code < 400:
            error = f"HTTP {status_code}: redirects are not followed"
    duration_ms = (time.perf_counter() - started) * 1000.0
    return _Exchange(status_code, error, duration_ms, permanent)


def _judge(
    claim: CallbackClaim,
    exchange: _Exchange,
    settings: Settings,
    *,
    attempted_at: datetime,
    now: datetime,
    worker: str | None,
) -> tuple[CallbackOutcome, float | None]:
    """The delivery's new state after an attempt, and the wait before the next (if any)."""

    def outcome(state: CallbackState, error: str | None, due: datetime | None) -> CallbackOutcome:
        return CallbackOutcome(
            state=state,
            status_code=exchange.status_code,
            error=error,
            duration_ms=exchange.duration_ms,
            attempted_at=attempted_at,
            worker=worker,
            next_attempt_at=due,
        )

    if exchange.error is None:
        return outcome(CallbackState.DELIVERED, None, None), None
    if exchange.permanent:
        return outcome(CallbackState.FAILED, exchange.error, None), None
    if claim.number >= settings.callback_max_attempts:
        error = f"{exchange.error} (gave up after {claim.number} attempts)"
        return outcome(CallbackState.FAILED, error, None), None
    wait = backoff(claim.number, settings)
    return outcome(CallbackState.PENDING, exchange.error, now + timedelta(seconds=wait)), wait


def deliver(
    request_id: str, settings: Settings, worker: str | None = None, *, refusals: int = 0
) -> CallbackState | None:
    """Make the next attempt of a request's callback, if it is due, no other attempt holds
    it and its key has a slot free, and schedule the one after when it fails. The delivery's
    state after the attempt, or None when this message had nothing to send or must wait for
    a slot (``refusals``: how many times it found the slots taken before)."""
    with session_scope(settings.database_url) as session:
        of = _sender_if_due(
            session, request_id, queries.database_now(session) + timedelta(seconds=EARLY_SECONDS)
        )
    if of is None:
        log.info("callback of %s: delivered, given up, not due or in flight", request_id)
        telemetry.record_callback("duplicate")
        return None
    slot = callback_slots.take(
        settings, of, settings.callback_timeout_seconds + CLAIM_MARGIN_SECONDS
    )
    if slot is None:
        _wait_for_slot(request_id, of, refusals + 1, settings)
        return None
    try:
        return _attempt(request_id, settings, worker)
    finally:
        callback_slots.give_back(settings, slot)


def _sender_if_due(session: Session, request_id: str, due_by: datetime) -> str | None:
    """Whose slots the next attempt of a request's callback takes, if one is due by
    ``due_by`` and not in flight; None when there is nothing to send."""
    delivery = queries.callback_delivery(session, request_id)
    if (
        delivery is None
        or delivery.state is not CallbackState.PENDING
        or delivery.next_attempt_at > due_by
    ):
        return None
    request = queries.get_request(session, request_id)
    return callback_slots.sender(None if request is None else request.api_key_id)


def _wait_for_slot(request_id: str, of: str, refusals: int, settings: Settings) -> None:
    """Send the callback again after a short wait, or leave it to the sweep: not an attempt,
    so it does not count against ``callback_max_attempts``."""
    telemetry.record_callback("deferred")
    wait = slot_wait(refusals, settings)
    if wait is None:
        log.warning("callback of %s: the slots of %s stay taken; left to the sweep", request_id, of)
        return
    log.info("callback of %s: the slots of %s are taken; again in %.1f s", request_id, of, wait)
    send_callbacks([request_id], countdown=wait, refusals=refusals)


def _attempt(request_id: str, settings: Settings, worker: str | None) -> CallbackState | None:
    """Claim the next attempt of a request's callback, make it and record how it went."""
    with session_scope(settings.database_url) as session:
        claimed_at = queries.database_now(session)
        claim = queries.claim_callback(
            session,
            request_id,
            due_by=claimed_at + timedelta(seconds=EARLY_SECONDS),
            hold_until=claimed_at
            + timedelta(seconds=settings.callback_timeout_seconds + CLAIM_MARGIN_SECONDS),
        )
        if claim is None:
            log.info("callback of %s: delivered, given up, not due or in flight", request_id)
            telemetry.record_callback("duplicate")
            return None
        letter = _letter(session, claim, settings)
    if isinstance(letter, str):
        exchange = _Exchange(None, letter, 0.0, permanent=True)
    else:
        exchange = _post(claim.url, letter, claim.number, settings)
    with session_scope(settings.database_url) as session:
        outcome, wait = _judge(
            claim,
            exchange,
            settings,
            attempted_at=claimed_at,
            now=queries.database_now(session),
            worker=worker,
        )
        queries.settle_callback(session, claim, outcome)
    _log(claim, outcome)
    telemetry.record_callback(_metric(exchange, outcome))
    if wait is not None and wait <= _longest_countdown(settings):
        send_callbacks([request_id], countdown=wait, attempt=claim.number + 1)
    return outcome.state


def _metric(exchange: _Exchange, outcome: CallbackOutcome) -> telemetry.CallbackOutcome:
    if outcome.state is CallbackState.DELIVERED:
        return "delivered"
    if outcome.state is CallbackState.FAILED:
        return "gave_up"
    return "rejected" if exchange.status_code is not None else "unreachable"


def _log(claim: CallbackClaim, outcome: CallbackOutcome) -> None:
    if outcome.state is CallbackState.DELIVERED:
        log.info("callback of %s delivered (attempt %d)", claim.request_id, claim.number)
    elif outcome.state is CallbackState.FAILED:
        log.error("callback of %s failed for good: %s", claim.request_id, outcome.error)
    else:
        log.warning(
            "callback of %s, attempt %d: %s; retrying at %s",
            claim.request_id,
            claim.number,
            outcome.error,
            outcome.next_attempt_at,
        )


def _longest_countdown(settings: Settings) -> float:
    """The longest wait a retry message may carry: Redis redelivers a message a worker holds
    past the visibility timeout, so a longer wait lives in the database, for the sweep."""
    return settings.visibility_timeout / 2


def resend_overdue(settings: Settings) -> int:
    """Send again the callbacks overdue by ``lost_after_seconds``: their message was lost, or
    an attempt's worker died. A message still on its way only repeats a claim, which then
    sends nothing. How many were sent."""
    with session_scope(settings.database_url) as session:
        now = queries.database_now(session)
        cutoff = now - timedelta(seconds=settings.lost_after_seconds)
        overdue = queries.overdue_callbacks(session, cutoff, now, SWEEP_LIMIT)
    for request_id in overdue:
        log.warning("re-sending the callback of %s: it is overdue", request_id)
    send_callbacks(overdue)
    return len(overdue)
