"""Backoff after an outage: a database or Redis outage is retried for
``transient_retry_seconds`` and then left to the sweeper; a store outage for as long as it
lasts, so that the sweeper never counts its steps as lost messages."""

from __future__ import annotations

from workers.engine.runner import transient_backoff
from workers.settings import Settings


def test_an_outage_is_retried_until_the_covered_time_then_left_to_the_sweeper() -> None:
    settings = Settings(transient_retry_seconds=60)
    delays = []
    retries = 0
    while (delay := transient_backoff(retries, settings)) is not None:
        delays.append(delay)
        retries += 1
    assert 60 <= sum(delays) <= 2 * 60 + 30
    assert max(delays) <= 30


def test_a_store_outage_is_retried_at_the_cap_for_as_long_as_it_lasts() -> None:
    settings = Settings(transient_retry_seconds=60)
    for retries in (0, 10, 100, 5000):
        delay = transient_backoff(retries, settings, endless=True)
        assert delay is not None
        assert 0 < delay <= 30
    assert transient_backoff(5000, settings, endless=True) >= 15  # type: ignore[operator]
