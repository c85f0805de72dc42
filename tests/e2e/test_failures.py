"""Failures end in ``failed`` with a reason, with real Celery workers: nothing is lost when
a task raises."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from db import queries
from db.session import session_scope
from tests.services import celery_worker, wait_until_final
from workers.producer import submit
from workers.settings import Settings

pytestmark = pytest.mark.e2e

PROMPTS = ("a red bicycle", "a bowl of soup on a table", "a cactus in a pot")


def test_a_request_whose_task_raises_ends_failed_with_the_reason(
    tiny_models: dict[str, Path],
    database: str,
    clean_db: str,
    settings: Settings,
    clean_redis: redis.Redis,
) -> None:
    """A cloud worker whose model cannot load: explored requests need it and fail for good;
    nothing stays queued or routed."""
    explore_all = {"T2IROUTE_CLOUD_RATIO": "1", "T2IROUTE_EXPLORATION_RATE": "1"}
    broken = {"T2IROUTE_CLOUD_MODEL": str(settings.model_store / "missing")}
    with (
        celery_worker("route,quality", "router-explore", env=explore_all),
        celery_worker("edge,cloud", "gpu-broken", env=broken),
    ):
        ids = [submit(prompt, seed=1).request_id for prompt in PROMPTS]
        states = wait_until_final(ids, timeout=180)
    with session_scope(clean_db) as session:
        for rid in ids:
            request = queries.get_request(session, rid)
            assert request is not None
            decision = queries.get_decision(session, rid)
            assert decision is not None and decision.explore
            assert states[rid] == "failed"
            assert request.failure_reason is not None
            assert request.failure_reason.startswith("generate cloud:")
