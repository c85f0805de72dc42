"""A soak: a thousand requests (T2IROUTE_TEST_FAULT_SCALE scales it) through several worker
processes with one-step tiny models; every count reconciles, and the throughput and the
end-to-end latency are printed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.fault.harness import Stack, Worker, prompts, scaled, settle, start

pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]


def test_a_thousand_requests_reconcile(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = start(
        make_stack(T2IROUTE_CLOUD_RATIO="0.3", T2IROUTE_EXPLORATION_RATE="0.05"),
        Worker("router", "route,quality,maintenance", pool="prefork", concurrency=2),
        Worker("edge", "edge"),
        Worker("cloud", "cloud"),
    )
    ids = stack.submit(prompts(scaled(1000)), steps=1, width=32, height=32)
    states = stack.wait_final(ids, timeout=480, interval=2.0)
    figures = settle(stack, ids, show, f"soak: {len(ids)} requests")

    assert set(states.values()) == {"done"}
    figures.check()
    assert figures.restarts == {}
    assert figures.resends == 0, "a fault-free run re-sent a message"
