"""The harness itself on a fault-free run: every request of a clean run ends done and the
reconciliation holds; what the scenarios add is the fault."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.fault.harness import Stack, prompts, scaled, settle, start

pytestmark = pytest.mark.fault


def test_a_clean_run_ends_done_and_reconciles(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = start(make_stack(T2IROUTE_CLOUD_RATIO="0.3", T2IROUTE_EXPLORATION_RATE="0.2"))
    ids = stack.submit(prompts(scaled(20)), steps=2)
    states = stack.wait_final(ids, timeout=120)
    figures = settle(stack, ids, show, "clean run")
    assert set(states.values()) == {"done"}
    figures.check()
    assert figures.restarts == {}
    counters = figures.budget_counters
    assert counters is not None and counters["requests"] == figures.decisions
