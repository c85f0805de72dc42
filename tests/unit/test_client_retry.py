"""The client's retry policy, pure: ``Retry-After`` read in both its forms (RFC 9110,
10.2.3), and the backoff's waits."""

from __future__ import annotations

import time
from email.utils import formatdate

import httpx
import pytest

from workers.entrypoints.client import RetryPolicy, _retry_after


def _after(value: str) -> float | None:
    return _retry_after(httpx.Response(503, headers={"Retry-After": value}))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5.0), ("0", 0.0), ("120", 120.0), (" 7 ", 7.0), ("1.5", 1.5)],
)
def test_delta_seconds_are_read(value: str, seconds: float) -> None:
    assert _after(value) == seconds


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon", "", "Fri, 99 Foo 2025"])
def test_what_reads_as_neither_form_is_none(value: str) -> None:
    assert _after(value) is None


def test_an_http_date_is_the_time_until_it() -> None:
    wait = _after(formatdate(time.time() + 10, usegmt=True))
    assert wait is not None and 8.9 < wait <= 10.0


def test_an_http_date_past_is_no_wait() -> None:
    assert _after("Sun, 06 Nov 1994 08:49:37 GMT") == 0.0
    assert _after("Sunday, 06-Nov-94 08:49:37 GMT") == 0.0  # RFC 850, obsolete but allowed


def test_no_header_and_no_answer_state_no_wait() -> None:
    assert _retry_after(httpx.Response(503)) is None
    assert _retry_after(None) is None


def test_the_backoff_doubles_from_half_a_second_with_jitter_up_to_its_cap() -> None:
    policy = RetryPolicy()
    for retry, (low, high) in enumerate([(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0)], 1):
        assert all(low <= policy.delay(retry) <= high for _ in range(100))
    assert all(2.5 <= policy.delay(12) <= 5.0 for _ in range(100))
