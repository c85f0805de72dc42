"""Duplicate delivery of every task type, while the request is in flight and after it is
done: nothing fails, nothing is written twice, the budget is not spent twice."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.fault.harness import FINAL, Stack, prompts, scaled, settle, snapshot, start
from workers.app.names import TASK_GENERATE, TASK_ROUTE, TASK_SCORE

pytestmark = pytest.mark.fault


def _progress(stack: Stack, ids: list[str]) -> tuple[dict[str, list[str]], set[tuple[str, str]]]:
    """Each routed request's tiers (answer first), and the (request, tier) pairs generated."""
    with stack.database() as conn:
        decisions = conn.execute(
            "SELECT request_id, tier, explored FROM routing_decisions WHERE request_id = ANY(%s)",
            (ids,),
        ).fetchall()
        generated = conn.execute(
            "SELECT request_id, tier FROM generations WHERE request_id = ANY(%s)", (ids,)
        ).fetchall()
    tiers = {
        str(rid): [str(tier), *(str(t) for t in explored if t != tier)]
        for rid, tier, explored in decisions
    }
    return tiers, {(str(r), str(t)) for r, t in generated}


def _copies(
    rid: str, tiers: list[str], generated: set[tuple[str, str]]
) -> list[tuple[str, list[str]]]:
    """The messages a request has had so far, as (task, args)."""
    messages = [(TASK_ROUTE, [rid])]
    messages += [(TASK_GENERATE, [rid, tier]) for tier in tiers]
    messages += [(TASK_SCORE, [rid, tier]) for tier in tiers if (rid, tier) in generated]
    return messages


def _image_times(stack: Stack) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in stack.image_store.rglob("*.png")}


def _drained(stack: Stack) -> bool:
    client = stack.broker()
    try:
        waiting, holding = snapshot(client, ["route", "edge", "cloud", "quality"])
        return not waiting and not holding
    finally:
        client.close()


def test_duplicates_of_every_step_change_nothing(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = start(
        make_stack(
            T2IROUTE_CLOUD_RATIO="0.5",
            T2IROUTE_CLOUD_BURST="2",
            T2IROUTE_EXPLORATION_RATE="0.3",
        )
    )
    ids = stack.submit(prompts(scaled(16)), steps=8)

    sent: set[tuple[str, str]] = set()

    def duplicate_in_flight(states: dict[str, str]) -> None:
        tiers, generated = _progress(stack, ids)
        for rid in ids:
            if states.get(rid) in FINAL:
                continue
            for task, args in _copies(rid, tiers.get(rid, []), generated):
                key = (task, "/".join(args))
                if key not in sent:
                    sent.add(key)
                    stack.send(task, args)

    stack.wait_final(ids, timeout=180, tick=duplicate_in_flight, interval=0.3)
    before = settle(stack, ids, show, "duplicates: after the in-flight copies")
    before.check()
    images = _image_times(stack)

    tiers, generated = _progress(stack, ids)
    late = [m for rid in ids for m in _copies(rid, tiers[rid], generated)]
    for _ in range(2):
        for task, args in late:
            stack.send(task, args)
    # Drained, then two sweeps more, so that anything the copies set off has happened.
    stack.wait_for(lambda: _drained(stack), timeout=120, what="the copies are consumed")
    time.sleep(2 * stack.settings.sweep_interval_seconds + 1)
    after = settle(stack, ids, show, "duplicates: after copies of finished requests")
    after.check()

    assert len(sent) > len(ids), "the in-flight copies were not sent"
    assert set(stack.statuses(ids).values()) == {"done"}
    assert after.failures == {} and before.failures == {}
    assert after.generations == before.generations
    assert after.tiers == before.tiers and after.explored == before.explored
    assert _image_times(stack) == images, "a duplicate rewrote an image"
    assert after.dispatch_failures == 0, "a duplicate delivery counted as a failure"
    counters = after.budget_counters
    assert counters is not None
    assert counters["requests"] == after.decisions, "the budget keeper decided twice"
    assert counters.get("cloud_generations", 0) == after.cloud_spends
    assert counters == before.budget_counters
    assert after.restarts == {}
