"""The fault suite's harness in one place: private servers, the stack of t2iroute
processes, broker inspection and reconciliation, and the few steps every scenario shares."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from tests.fault.broker import (
    STEPS,
    DispatchId,
    TaskMessage,
    held,
    per_step,
    queued,
    snapshot,
)
from tests.fault.reconcile import Reconciliation, reconcile
from tests.fault.servers import PostgresServer, RedisServer
from tests.fault.stack import FAULT_ENV, FINAL, Process, Stack, Worker
from workers.entrypoints.demo import demo_prompts

__all__ = [
    "FAULT_ENV",
    "FINAL",
    "GPU",
    "ROUTER",
    "STEPS",
    "DispatchId",
    "PostgresServer",
    "Process",
    "Reconciliation",
    "RedisServer",
    "Stack",
    "TaskMessage",
    "Worker",
    "held",
    "per_step",
    "prompts",
    "queued",
    "reconcile",
    "scaled",
    "settle",
    "snapshot",
    "start",
]

# Counts scale with T2IROUTE_TEST_FAULT_SCALE (1 by default): below 1 for a quick look, above 1
# for a longer run.
SCALE = float(os.environ.get("T2IROUTE_TEST_FAULT_SCALE", "1"))


def scaled(n: int) -> int:
    return max(1, round(n * SCALE))


def prompts(n: int) -> list[str]:
    """n prompts from the demo's list, numbered so that no two are the same."""
    return [f"{text} #{i}" for i, text in zip(range(n), itertools.cycle(demo_prompts(None)))]


ROUTER = Worker("router", "route,quality,maintenance,callbacks")
GPU = Worker("gpu", "edge,cloud")


def start(stack: Stack, *workers: Worker, beat: bool = True, api: bool = True) -> Stack:
    """Start the given workers (default: a router/quality/maintenance worker and a GPU-style
    worker for both tiers), beat and the API, and wait until they are up."""
    for worker in workers or (ROUTER, GPU):
        stack.add_worker(worker)
    if beat:
        stack.add_beat()
    if api:
        stack.add_api()
    stack.wait_ready()
    return stack


def settle(stack: Stack, ids: list[str], show: Callable[[str], None], title: str) -> Reconciliation:
    """Reconcile a finished run, once its side steps are over, and print the figures."""
    stack.wait_steps_closed(ids)
    figures = reconcile(stack, ids)
    show("\n" + figures.render(title))
    return figures
