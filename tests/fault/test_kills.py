"""kill -9 in the middle of a generation: of a prefork pool child, and of a whole worker.
A worker that died holding a message is an attempt, never a lost request: every request
ends done."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.fault.harness import ROUTER, Process, Stack, Worker, held, prompts, scaled, settle, start

pytestmark = pytest.mark.fault

# Slow enough (about 2 s on edge, 5 s on cloud on one thread) that a kill lands mid-image.
STEPS = 40
ROUTING = {"T2IROUTE_CLOUD_RATIO": "0.3", "T2IROUTE_EXPLORATION_RATE": "0.2"}


def _generating(stack: Stack) -> bool:
    """A generation message is held by a worker, and that worker has loaded its models
    (one image exists), so it is rendering now."""
    client = stack.broker()
    try:
        holding = any(m.task.startswith("t2iroute.generate") for m in held(client))
    finally:
        client.close()
    return holding and any(stack.image_store.rglob("*.png"))


def _replaced(worker: Process, old: list[int]) -> Callable[[], bool]:
    return lambda: worker.children() not in ([], old)


def test_a_killed_pool_child_costs_an_attempt_not_a_request(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    gpu = Worker("gpu", "edge,cloud", pool="prefork", concurrency=1)
    stack = start(make_stack(**ROUTING), ROUTER, gpu)
    ids = stack.submit(prompts(scaled(6)), steps=STEPS)
    worker = stack.processes["gpu"]

    kills = 0
    for _ in range(2):
        stack.wait_for(lambda: _generating(stack), timeout=120, what="a generation runs")
        children = worker.children()
        assert len(children) == 1, children
        time.sleep(0.5)
        stack.kill_child("gpu", children[0])
        kills += 1
        # The pool replaces its child; wait for that before the next kill.
        stack.wait_for(_replaced(worker, children), timeout=60, what="a new pool child")
    states = stack.wait_final(ids, timeout=180)
    figures = settle(stack, ids, show, f"kill -9 of a pool child, {kills} times")

    assert set(states.values()) == {"done"}
    figures.check()
    assert figures.dispatch_failures is not None and figures.dispatch_failures >= 1, (
        "a worker that died holding the message is an attempt"
    )
    assert figures.restarts == {}, "the worker itself should have survived its child"


def test_a_killed_worker_gets_its_message_back(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = start(make_stack(**ROUTING))
    ids = stack.submit(prompts(scaled(6)), steps=STEPS)

    stack.wait_for(lambda: _generating(stack), timeout=120, what="a generation runs")
    time.sleep(0.5)
    stack.processes["gpu"].kill()
    killed_at = time.monotonic()
    # A supervisor starts it again at once; the message it held is still unacknowledged.
    stack.restart("gpu")
    settings = stack.settings
    # kombu restores an unacknowledged message after the visibility timeout, at its next
    # restore sweep (every ``unacked_restore_interval * unacked_restore_throttle`` s).
    states = stack.wait_final(ids, timeout=settings.visibility_timeout + 100 + 120)
    recovered = time.monotonic() - killed_at
    figures = settle(stack, ids, show, "kill -9 of a whole worker mid-generation")
    show(f"whole-worker kill: all requests final {recovered:.0f} s after the kill")

    assert set(states.values()) == {"done"}
    figures.check()
    assert figures.restarts == {"gpu": 1}
