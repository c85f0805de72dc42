"""Failures with real Celery workers: a tier whose model cannot load fails none of the
requests another tier can serve; a request no tier can serve ends ``failed`` with the
reason. Nothing stays queued or routed."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from db import queries
from db.models import Status, StepStatus, TierHealth
from db.session import session_scope
from tests.services import celery_worker, wait_until_final, wait_until_steps_closed
from workers.producer import submit
from workers.settings import Settings

pytestmark = pytest.mark.e2e

PROMPTS = ("a red bicycle", "a bowl of soup on a table", "a cactus in a pot")

EXPLORE_ALL = {
    "T2IROUTE_CLOUD_RATIO": "1",
    "T2IROUTE_EXPLORATION_RATE": "1",
    "T2IROUTE_MAX_ATTEMPTS": "2",
    # Every request reaches the broken tier (the circuit breaker is the fault suite's).
    "T2IROUTE_TIER_FAILURE_THRESHOLD": "100",
}


def _unloadable_model(settings: Settings) -> str:
    """A model folder a worker starts with (a missing one stops it: workers.runtime
    .missing_models) and that cannot load: its model_index.json names no pipeline."""
    folder = settings.model_store / "unloadable"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    return str(folder)


def test_a_broken_cloud_tier_fails_no_request_the_edge_can_serve(
    tiny_models: dict[str, Path],
    database: str,
    clean_db: str,
    settings: Settings,
    clean_redis: redis.Redis,
) -> None:
    """Every request is explored on both tiers and the cloud model cannot load: requests
    answered by the cloud move to the edge, the cloud's exploration is dropped, and all end
    done with no training pair."""
    broken = {**EXPLORE_ALL, "T2IROUTE_CLOUD_MODEL": _unloadable_model(settings)}
    with (
        celery_worker("route,quality", "router-explore", env=EXPLORE_ALL),
        celery_worker("edge,cloud", "gpu-broken", env=broken),
    ):
        ids = [submit(prompt, seed=1).request_id for prompt in PROMPTS]
        states = wait_until_final(ids, timeout=180)
        wait_until_steps_closed(ids, timeout=120)
    assert set(states.values()) == {"done"}
    with session_scope(clean_db) as session:
        for rid in ids:
            decision = queries.get_decision(session, rid)
            assert decision is not None and decision.explored
            assert decision.tier == "edge"
            if decision.rerouted_from is not None:
                assert decision.rerouted_from == "cloud"
                assert decision.reroute_reason is not None
                assert decision.reroute_reason.startswith("generate:cloud:")
            cloud = queries.step_status(session, rid, "generate:cloud")
            assert cloud in (StepStatus.FAILED, StepStatus.ABANDONED)
            assert [g.tier for g in queries.generations_of(session, rid)] == ["edge"]
        assert queries.training_pairs(session, "v1") == []
        health = session.get(TierHealth, "cloud")
        assert health is not None and health.consecutive_failures >= 2
        assert health.last_error is not None and "generate:cloud" in health.last_error


def test_a_request_no_tier_can_serve_ends_failed_with_the_reason(
    tiny_models: dict[str, Path],
    database: str,
    clean_db: str,
    settings: Settings,
    clean_redis: redis.Redis,
) -> None:
    missing = _unloadable_model(settings)
    both_broken = {
        **EXPLORE_ALL,
        "T2IROUTE_EXPLORATION_RATE": "0",
        "T2IROUTE_EDGE_MODEL": missing,
        "T2IROUTE_CLOUD_MODEL": missing,
    }
    with (
        celery_worker("route,quality", "router", env=both_broken),
        celery_worker("edge,cloud", "gpu-broken", env=both_broken),
    ):
        rid = submit(PROMPTS[0], seed=1).request_id
        states = wait_until_final([rid], timeout=180)
    assert states[rid] == "failed"
    with session_scope(clean_db) as session:
        request = queries.get_request(session, rid)
        assert request is not None and request.status is Status.FAILED
        assert request.failure_reason is not None
        assert "gave up after 2 failed attempts" in request.failure_reason
        decision = queries.get_decision(session, rid)
        assert decision is not None and decision.rerouted_from is not None
        assert {s.status for s in queries.steps_of(session, rid)} <= {
            StepStatus.DONE,
            StepStatus.FAILED,
            StepStatus.ABANDONED,
        }
