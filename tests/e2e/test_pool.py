"""A three-tier pool end to end with real Celery workers on the real Redis and Postgres: two
tiny pipelines, one of them also at another step count, each tier on its own queue."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from db import queries
from db.models import Generation, RoutingDecision
from db.session import session_scope
from tests.services import celery_worker, wait_until_final, wait_until_steps_closed
from workers.services.producer import submit
from workers.settings import Settings

pytestmark = pytest.mark.e2e

PROMPTS = (
    "a red bicycle leaning on a brick wall",
    "three dogs and a cat playing in the snow under a street lamp",
    "a bowl of soup",
    "a wooden boat on a calm lake at dawn with mountains and a castle behind it",
    "an astronaut reading a newspaper",
    "a cactus",
)


def _serve_every_prompt(env: dict[str, str], gpu_workers: dict[str, str]) -> None:
    """Submit every prompt to a router worker and one worker per group of tiers, all with
    ``env``; every request must end done, its steps all closed."""
    with ExitStack() as workers:
        workers.enter_context(celery_worker("route,quality", "router", env=env))
        for name, tiers in gpu_workers.items():
            workers.enter_context(celery_worker("", name, env=env, tiers=tiers))
        ids = [submit(prompt, seed=i).request_id for i, prompt in enumerate(PROMPTS)]
        states = wait_until_final(ids, timeout=240)
        wait_until_steps_closed(ids, timeout=120)
    assert set(states.values()) == {"done"}, states


def test_a_three_tier_pool_serves_every_request_within_its_cost_budget(
    tiny_models: dict[str, Path],
    database: str,
    clean_db: str,
    settings: Settings,
    clean_redis: redis.Redis,
) -> None:
    tiers = [
        {"name": "turbo", "model": str(tiny_models["edge"]), "cost": 0.5, "steps": 1},
        {"name": "base", "model": str(tiny_models["edge"]), "cost": 1.0, "steps": 3},
        {"name": "large", "model": str(tiny_models["cloud"]), "cost": 10.0, "queue": "gpu-large"},
    ]
    env = {
        "T2IROUTE_TIERS": json.dumps(tiers),
        "T2IROUTE_BUDGET_PER_REQUEST": "3",
        "T2IROUTE_CLOUD_BURST": "1",
        "T2IROUTE_EXPLORATION_RATE": "0.5",
    }
    _serve_every_prompt(env, {"gpu-small": "turbo,base", "gpu-large": "large"})
    with session_scope(clean_db) as session:
        decisions = list(session.scalars(select(RoutingDecision)))
        assert len(decisions) == len(PROMPTS)
        spent = 0.0
        for decision in decisions:
            assert set(decision.predicted_quality) == {"turbo", "base", "large"}
            assert decision.tier in ("turbo", "base", "large")
            generated = {g.tier for g in queries.generations_of(session, decision.request_id)}
            assert generated == set(queries.wanted_tiers(decision))
            assert set(queries.scored_tiers(session, decision.request_id, "v1")) == generated
            spent += decision.spent
        # B * N + C: B = 3 cost units a request, C = one image of the dearest tier (9.5).
        assert spent <= 3 * len(PROMPTS) + 9.5
        # Every image above the cheapest tier's price was paid for.
        extra = {"turbo": 0.0, "base": 0.5, "large": 9.5}
        rows = session.execute(select(Generation.tier, func.count()).group_by(Generation.tier))
        assert sum(extra[tier] * n for tier, n in rows) == pytest.approx(spent)


def test_answers_below_the_threshold_escalate_one_tier_up(
    tiny_models: dict[str, Path],
    database: str,
    clean_db: str,
    settings: Settings,
    clean_redis: redis.Redis,
) -> None:
    """A threshold no tiny image reaches forces every edge answer up to the cloud."""
    env = {
        "T2IROUTE_ESCALATION_THRESHOLD": "1.0",
        "T2IROUTE_CLOUD_RATIO": "1",
        "T2IROUTE_EXPLORATION_RATE": "0",
    }
    _serve_every_prompt(env, {"gpu": "edge,cloud"})
    with session_scope(clean_db) as session:
        escalated = 0
        for decision in session.scalars(select(RoutingDecision)):
            quality = queries.mean_quality_of(session, decision.request_id)
            if decision.escalations:
                escalated += 1
                (made,) = decision.escalations
                assert (made["from"], made["to"]) == ("edge", "cloud")
                assert set(quality) == {"edge", "cloud"}
                # The better image answers.
                assert decision.tier == max(quality, key=lambda t: quality[t])
            else:
                assert decision.tier == "cloud" and set(quality) == {"cloud"}
            assert decision.escalating_to is None
        assert escalated > 0
