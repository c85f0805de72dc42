"""Server outages mid-run: Redis (broker and budget keeper) killed -9 and restarted, with
and without persistence, and PostgreSQL stopped for half a minute. Nothing accepted is
lost; what Redis forgot is re-sent by the sweeper within its bound."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest

from tests.fault.harness import Stack, prompts, scaled, settle, start

pytestmark = pytest.mark.fault

ROUTING = {
    "T2IROUTE_CLOUD_RATIO": "0.4",
    "T2IROUTE_CLOUD_BURST": "3",
    "T2IROUTE_EXPLORATION_RATE": "0.2",
}


def _some_done(stack: Stack, ids: list[str], share: float) -> Callable[[], bool]:
    def check() -> bool:
        return list(stack.statuses(ids).values()).count("done") >= share * len(ids)

    return check


def _resent(stack: Stack) -> bool:
    """Some dispatch was sent more than once."""
    try:
        with stack.database() as conn:
            row = conn.execute("SELECT coalesce(max(sends), 0) FROM dispatches").fetchone()
    except psycopg.Error:
        return False
    return row is not None and int(row[0]) > 1


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_redis_killed_and_restarted_mid_run(
    appendonly: bool, make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = start(make_stack(appendonly=appendonly, **ROUTING))
    settings = stack.settings
    ids = stack.submit(prompts(scaled(24)), steps=6)
    stack.wait_for(_some_done(stack, ids, 0.25), timeout=120, what="a quarter done")

    stack.redis.kill()
    time.sleep(3)
    stack.redis.start()
    restarted = time.monotonic()
    resent_after: list[float] = []

    def watch_resends(_: dict[str, str]) -> None:
        if not resent_after and _resent(stack):
            resent_after.append(time.monotonic() - restarted)

    states = stack.wait_final(ids, timeout=240, tick=watch_resends)
    took = time.monotonic() - restarted
    mode = "AOF, fsync always" if appendonly else "no persistence"
    figures = settle(stack, ids, show, f"Redis kill -9 and restart ({mode})")
    bound = settings.lost_after_seconds + 2 * settings.sweep_interval_seconds + 10
    first = f"{resent_after[0]:.1f} s after it" if resent_after else "never"
    show(
        f"Redis ({mode}): final {took:.0f} s after the restart; first resend {first} "
        f"(bound {bound:.0f} s); restarts {figures.restarts}"
    )

    assert set(states.values()) == {"done"}
    figures.check()
    if not appendonly:
        # The restarted Redis is empty: every waiting message is gone and must be re-sent.
        assert resent_after, "nothing was re-sent after Redis lost its messages"
        assert resent_after[0] <= bound, "the sweeper re-sent lost messages too late"


def test_postgres_stopped_for_half_a_minute(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = start(make_stack(**ROUTING))
    ids = stack.submit(prompts(scaled(24)), steps=6)
    stack.wait_for(_some_done(stack, ids, 0.25), timeout=120, what="a quarter done")

    stack.postgres.stop()
    outage = time.monotonic() + 30
    while time.monotonic() < outage:
        stack.supervise()
        time.sleep(0.5)
    stack.postgres.start()
    restarted = time.monotonic()
    states = stack.wait_final(ids, timeout=180)
    figures = settle(stack, ids, show, "PostgreSQL stopped for 30 s mid-run")
    show(f"PostgreSQL: final {time.monotonic() - restarted:.0f} s after the restart")

    assert set(states.values()) == {"done"}, "a database outage is transient, never a failure"
    figures.check()
    assert figures.restarts == {}, "a worker died of a database outage"
