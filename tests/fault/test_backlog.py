"""A backlog is not a fault: with no generation worker for several sweep periods, the
sweeper re-sends nothing that waits in a queue, and once a worker starts every request
ends done."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.fault.harness import (
    GPU,
    ROUTER,
    Stack,
    per_step,
    prompts,
    scaled,
    settle,
    snapshot,
    start,
)

pytestmark = pytest.mark.fault

QUEUES = ("route", "edge", "cloud", "quality")


class QueueWatch:
    """Inspects the broker at every poll: the most copies of one (request, step) seen
    waiting or held at once, and every message whose id is not a dispatch id."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.most: Counter[tuple[str, str]] = Counter()
        self.looks = 0
        self.foreign: set[str] = set()

    def __call__(self, _: object = None) -> None:
        client = self.stack.broker()
        try:
            waiting, holding = snapshot(client, list(QUEUES))
        finally:
            client.close()
        self.looks += 1
        for key, n in per_step(waiting + holding).items():
            if key[0] == "?":
                self.foreign.add(key[1])
            else:
                self.most[key] = max(self.most[key], n)

    @property
    def worst(self) -> int:
        return max(self.most.values(), default=0)


def test_a_backlog_is_served_without_resends(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = start(make_stack(T2IROUTE_CLOUD_RATIO="0.4", T2IROUTE_EXPLORATION_RATE="0.2"), ROUTER)
    settings = stack.settings
    ids = stack.submit(prompts(scaled(12)), steps=2)
    watch = QueueWatch(stack)

    # Several lost-after periods with the generation queues full and nobody to take them.
    until = time.monotonic() + 3 * settings.lost_after_seconds + 2 * settings.sweep_interval_seconds
    while time.monotonic() < until:
        watch()
        stack.supervise()
        time.sleep(0.3)
    waiting = stack.statuses(ids)
    generate_waiting = sum(n for (_, step), n in watch.most.items() if step.startswith("generate"))

    stack.add_worker(GPU)
    stack.wait_ready("gpu")
    states = stack.wait_final(ids, timeout=120, tick=watch, interval=0.3)
    figures = settle(stack, ids, show, "backlog: no generation worker, then one")
    show(
        f"backlog: {watch.looks} looks at the queues, most copies of one (request, step) "
        f"at once: {watch.worst}, messages without a dispatch id: {len(watch.foreign)}"
    )

    assert "failed" not in waiting.values(), "a request failed while it waited in a queue"
    assert generate_waiting >= len(ids), "the generation queues did not hold the backlog"
    assert not watch.foreign, (
        f"task ids not of the form step/request/n: {sorted(watch.foreign)[:3]}"
    )
    assert watch.worst == 1, f"a step was queued twice: {watch.most.most_common(3)}"
    assert set(states.values()) == {"done"}
    figures.check()
    assert figures.resends == 0, "the sweeper re-sent a message that waited in a queue"
    assert figures.restarts == {}
