"""The callback signature as a receiver checks it, and the retry backoff's bounds."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from workers.settings import Settings
from workers.stages.callbacks import backoff, sign, verify_signature

BODY = b'{"request_id":"r1","state":"done"}'
NOW = 1_800_000_000


def test_the_signature_is_an_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(b"s3cret", b"1800000000." + BODY, hashlib.sha256).hexdigest()
    assert sign("s3cret", "1800000000", BODY) == f"sha256={expected}"


def test_a_fresh_signature_verifies() -> None:
    header = sign("s3cret", str(NOW), BODY)
    assert verify_signature("s3cret", str(NOW), BODY, header, now=NOW + 10)


@pytest.mark.parametrize(
    ("secret", "timestamp", "body", "now"),
    [
        ("another", str(NOW), BODY, NOW),  # wrong secret
        ("s3cret", str(NOW), BODY + b" ", NOW),  # body changed
        ("s3cret", str(NOW + 1), BODY, NOW),  # timestamp changed
        ("s3cret", str(NOW), BODY, NOW + 301),  # too old: a replay
        ("s3cret", f" {NOW}", BODY, NOW),  # not a plain number
        ("s3cret", "", BODY, NOW),
    ],
)
def test_anything_altered_or_stale_does_not_verify(
    secret: str, timestamp: str, body: bytes, now: int
) -> None:
    header = sign("s3cret", str(NOW), BODY)
    assert not verify_signature(secret, timestamp, body, header, now=now)


def test_the_age_check_can_be_left_out() -> None:
    header = sign("s3cret", str(NOW), BODY)
    assert verify_signature("s3cret", str(NOW), BODY, header, max_age_seconds=None, now=0)
    assert not verify_signature("s3cret", str(NOW), BODY, "sha256=00", max_age_seconds=None)


def test_backoff_doubles_within_jitter_and_stops_at_the_cap() -> None:
    settings = Settings(callback_backoff_seconds=2.0, callback_backoff_max_seconds=60.0)
    for attempt, step in [(1, 2.0), (2, 4.0), (3, 8.0), (6, 60.0), (30, 60.0)]:
        waits = [backoff(attempt, settings) for _ in range(200)]
        assert all(step / 2 <= w <= step for w in waits)
        assert max(waits) - min(waits) > step / 10, "the waits are jittered"
