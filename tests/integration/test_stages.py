"""Step functions on the real Postgres and Redis: a redelivered task changes nothing, a
failed exploration tier never fails the answer, and a failing answer tier is replaced."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pytest
import redis
from PIL import Image

from db import queries
from db.models import GenerationRequest, Status, StepStatus
from db.session import session_scope
from workers import stages
from workers.app import flow
from workers.app.flow import Step
from workers.services.budget import (
    BudgetKeeper,
    BudgetLimits,
    LocalBudgetKeeper,
    budget_keeper_from_settings,
)
from workers.services.images import ImageStore
from workers.services.producer import submit
from workers.services.router import RouterService
from workers.services.runtime import quality_scorer
from workers.settings import Settings

pytestmark = pytest.mark.integration

T = TypeVar("T")


def _one(outcome: T | stages.RequestGone) -> T:
    """One request's outcome of a batched stage, its being gone raised."""
    if isinstance(outcome, stages.RequestGone):
        raise outcome
    return outcome


def _keeper(settings: Settings, **limits: float) -> BudgetKeeper:
    return LocalBudgetKeeper(BudgetLimits.from_settings(settings.model_copy(update=limits)))


def _route(
    url: str, request_id: str, settings: Settings, budget: BudgetKeeper | None = None
) -> list[Step]:
    budget = budget or budget_keeper_from_settings(settings)
    with session_scope(url) as session:
        assert queries.start_step(session, request_id, "route", redelivered=False)
    with session_scope(url) as session:
        outcomes = stages.route_requests(
            session, [request_id], RouterService(settings), budget, settings.pool
        )
        return _one(outcomes[request_id])


def _render(request: GenerationRequest) -> Image.Image:
    return Image.new("RGB", (request.width, request.height), "blue")


def _generate(url: str, request_id: str, tier: str, store: ImageStore) -> list[Step]:
    with session_scope(url) as session:
        job = _one(stages.generation_jobs(session, [(request_id, tier)])[(request_id, tier)])
    image = None
    if job is not None:
        path = store.save(request_id, tier, _render(job))
        image = stages.NewImage(model="m", image_path=path, latency_ms=1.0, worker="w")
    with session_scope(url) as session:
        return stages.complete_generations(session, {(request_id, tier): image})[(request_id, tier)]


def _status(url: str, request_id: str) -> Status:
    with session_scope(url) as session:
        request = queries.get_request(session, request_id)
        assert request is not None
        return request.status


def test_routing_twice_records_one_decision_spends_once_and_sends_nothing_twice(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    budget = budget_keeper_from_settings(settings)
    router = RouterService(settings)
    request_id = submit("a crowd of people in a stadium at night", seed=1).request_id
    with session_scope(clean_db) as session:
        first = _one(
            stages.route_requests(session, [request_id], router, budget, settings.pool)[request_id]
        )
    with session_scope(clean_db) as session:
        again = _one(
            stages.route_requests(session, [request_id], router, budget, settings.pool)[request_id]
        )
        request = queries.get_request(session, request_id)
        assert request is not None and request.status is Status.ROUTED
        decision = queries.get_decision(session, request_id)
        assert decision is not None
    assert [s.tier for s in first] == list(queries.wanted_tiers(decision))
    assert again == []
    assert budget.stats()["requests"] == 1


def _break(url: str, *tiers: str) -> None:
    """Open the breaker of each tier, as failed generations in a row would."""
    with session_scope(url) as session:
        for tier in tiers:
            queries.record_tier_failure(
                session, tier, f"{tier} is broken", threshold=1, cooldown_seconds=300
            )


#: Prompts of many lengths: the cold-start policy wants edge for some and cloud for others.
PROMPTS = [
    "a cat",
    "a red bicycle leaning on a wall",
    "an astronaut riding a horse on the moon, photorealistic, golden hour, 35 mm film",
    "two dogs",
    "a bowl of ramen with a soft-boiled egg, steam rising, shot from above on a dark table",
    "a lighthouse",
]


@pytest.mark.parametrize(
    ("down", "cloud_ratio", "rerouted"),
    [
        # Every tier out of service: the router falls back to its ranking, and nothing is
        # rerouted (issue 18, defect 6: edge decisions said they were rerouted from edge).
        (("edge", "cloud"), 1.0, False),
        # The cheapest out of service and the dearer refused: the keeper grants the cheapest,
        # the tier wanted first, which is no reroute either.
        (("edge",), 0.0, False),
        # The dearer out of service: whoever wanted it is rerouted to edge, with the reason.
        (("cloud",), 1.0, True),
    ],
    ids=["all-down", "edge-down-cloud-refused", "cloud-down"],
)
def test_a_decision_records_a_reroute_only_when_the_granted_tier_is_not_the_one_wanted(
    clean_db: str,
    clean_redis: redis.Redis,
    settings: Settings,
    down: tuple[str, ...],
    cloud_ratio: float,
    rerouted: bool,
) -> None:
    _break(clean_db, *down)
    budget = _keeper(settings, exploration_rate=0.0, cloud_ratio=cloud_ratio)
    ids = [submit(prompt, seed=i).request_id for i, prompt in enumerate(PROMPTS)]
    for request_id in ids:
        _route(clean_db, request_id, settings, budget)
    with session_scope(clean_db) as session:
        decisions = [queries.get_decision(session, rid) for rid in ids]
    rows = [(d.wanted_tier, d.tier, d.rerouted_from, d.reroute_reason) for d in decisions if d]
    assert len(rows) == len(ids)
    assert {wanted for wanted, *_ in rows} == {"edge", "cloud"}, "the prompts want one tier"
    for wanted, tier, source, reason in rows:
        moved = rerouted and wanted in down
        assert (source, reason is not None) == ((wanted, True) if moved else (None, False)), (
            f"wanted {wanted}, granted {tier}: rerouted_from {source!r} ({reason})"
        )
        if moved:
            assert tier != wanted and reason == f"{wanted} out of service: {wanted} is broken"


def test_a_request_no_tier_can_serve_gets_its_charge_back_once_its_failure_commits(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    """Issue 18, defect 7: the cloud was charged, its generation gave up and the edge is out
    of service, so the request fails; what it was charged goes back to the bucket, once, and
    only when the failure is committed."""
    budget = _keeper(settings, exploration_rate=0.0, cloud_ratio=1.0)
    ids = [submit(prompt, seed=i).request_id for i, prompt in enumerate(PROMPTS)]
    for request_id in ids:
        _route(clean_db, request_id, settings, budget)
    with session_scope(clean_db) as session:
        decisions = [queries.get_decision(session, rid) for rid in ids]
    request_id = next(d.request_id for d in decisions if d is not None and d.tier == "cloud")
    charged = budget.stats()
    _break(clean_db, "edge")
    step = flow.generate("cloud")

    class RolledBack(Exception):
        pass

    with pytest.raises(RolledBack), session_scope(clean_db) as session:
        stages.give_up(session, request_id, step, "broken", budget, settings.pool)
        raise RolledBack
    assert _status(clean_db, request_id) is Status.ROUTED
    assert budget.stats() == charged, "a failure rolled back gave budget back"

    with session_scope(clean_db) as session:
        assert stages.give_up(session, request_id, step, "broken", budget, settings.pool) == []
    assert _status(clean_db, request_id) is Status.FAILED
    refunded = budget.stats()
    extra = budget.limits.extra_cost("cloud")
    assert refunded["refunded"] == extra
    assert refunded["spend_tokens"] == min(budget.limits.burst, charged["spend_tokens"] + extra)
    # Given up again (a late duplicate): the request is failed already, nothing more back.
    with session_scope(clean_db) as session:
        stages.give_up(session, request_id, step, "broken", budget, settings.pool)
    assert budget.stats() == refunded


def test_a_duplicate_of_a_finished_step_is_not_an_attempt(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a teapot", seed=2).request_id
    _route(clean_db, request_id, settings)
    for _ in range(settings.max_attempts + 2):
        with session_scope(clean_db) as session:
            assert queries.start_step(session, request_id, "route", redelivered=False) is None
    with session_scope(clean_db) as session:
        (route,) = [s for s in queries.steps_of(session, request_id) if s.step == "route"]
        assert route.status is StepStatus.DONE and route.failures == 0
    assert _status(clean_db, request_id) is Status.ROUTED


def test_a_redelivery_of_a_step_a_worker_held_counts_one_failure(
    clean_db: str, clean_redis: redis.Redis
) -> None:
    request_id = submit("a lamp", seed=3).request_id
    with session_scope(clean_db) as session:
        first = queries.start_step(session, request_id, "route", redelivered=False)
        # A copy that is not a redelivery (a duplicate message) is no failure ...
        copy = queries.start_step(session, request_id, "route", redelivered=False)
        # ... but the broker's redelivery of a message a worker held while it died is.
        again = queries.start_step(session, request_id, "route", redelivered=True)
    assert first is not None and first.failures == 0
    assert copy is not None and copy.failures == 0
    assert again is not None and again.failures == 1


def test_generation_is_stored_once_per_tier(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a teapot", seed=2).request_id
    (step, *_) = _route(clean_db, request_id, settings)
    assert step.tier is not None
    store = ImageStore(settings.image_store)
    assert _generate(clean_db, request_id, step.tier, store) == [flow.score(step.tier)]
    # A redelivery finds the image, renders nothing and sends no second score.
    with session_scope(clean_db) as session:
        key = (request_id, step.tier)
        assert _one(stages.generation_jobs(session, [key])[key]) is None
    assert _generate(clean_db, request_id, step.tier, store) == []
    with session_scope(clean_db) as session:
        assert len(queries.generations_of(session, request_id)) == 1
        decision = queries.get_decision(session, request_id)
        assert decision is not None
        other = "cloud" if step.tier == "edge" else "edge"
        if other not in queries.wanted_tiers(decision):
            with pytest.raises(stages.RequestGone):
                _one(stages.generation_jobs(session, [(request_id, other)])[(request_id, other)])


def test_a_final_request_is_gone_for_every_stage(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a lamp", seed=3).request_id
    with session_scope(clean_db) as session:
        assert queries.fail(session, request_id, "cancelled by test")
        assert {s.status for s in queries.steps_of(session, request_id)} == {StepStatus.ABANDONED}
    with session_scope(clean_db) as session, pytest.raises(stages.RequestGone):
        outcomes = stages.route_requests(
            session,
            [request_id],
            RouterService(settings),
            budget_keeper_from_settings(settings),
            settings.pool,
        )
        _one(outcomes[request_id])


def test_a_failed_exploration_tier_never_fails_the_answer(
    tiny_models: dict[str, Path], clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("two cats on a sofa", seed=4).request_id
    steps = _route(
        clean_db, request_id, settings, _keeper(settings, exploration_rate=1.0, cloud_ratio=1.0)
    )
    with session_scope(clean_db) as session:
        decision = queries.get_decision(session, request_id)
        assert decision is not None
        answer, (explored,) = decision.tier, decision.explored
    assert {s.tier for s in steps} == {"edge", "cloud"}
    budget = budget_keeper_from_settings(settings)
    with session_scope(clean_db) as session:
        gave_up = stages.give_up(
            session, request_id, flow.generate(explored), "broken", budget, settings.pool
        )
        assert gave_up == []
        assert queries.step_status(session, request_id, f"generate:{explored}") is (
            StepStatus.ABANDONED
        )
    assert _status(clean_db, request_id) is Status.ROUTED
    store = ImageStore(settings.image_store)
    _generate(clean_db, request_id, answer, store)
    scorer = quality_scorer(settings)
    with session_scope(clean_db) as session:
        key = (request_id, answer)
        _one(stages.score_images(session, [key], scorer=scorer, store=store)[key])
    assert _status(clean_db, request_id) is Status.DONE
    with session_scope(clean_db) as session:
        assert not queries.training_pairs(session, scorer.metrics_version)


def test_a_failing_answer_tier_is_replaced_by_one_that_works(
    tiny_models: dict[str, Path], clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a castle on a hill", seed=5).request_id
    budget = _keeper(settings, exploration_rate=0.0, cloud_ratio=1.0)
    (step,) = _route(clean_db, request_id, settings, budget)
    assert step.tier is not None
    with session_scope(clean_db) as session:
        queries.start_step(session, request_id, step.key, redelivered=False)
        (fallback,) = stages.give_up(
            session, request_id, step, "weights are broken", budget, settings.pool
        )
    other = "cloud" if step.tier == "edge" else "edge"
    assert fallback == flow.generate(other)
    with session_scope(clean_db) as session:
        decision = queries.get_decision(session, request_id)
        assert decision is not None
        assert (decision.tier, decision.rerouted_from) == (other, step.tier)
        assert decision.reroute_reason == "weights are broken"
        assert queries.step_status(session, request_id, step.key) is StepStatus.FAILED
    store = ImageStore(settings.image_store)
    assert _generate(clean_db, request_id, other, store) == [flow.score(other)]
    with session_scope(clean_db) as session:
        key = (request_id, other)
        _one(stages.score_images(session, [key], scorer=quality_scorer(settings), store=store)[key])
    assert _status(clean_db, request_id) is Status.DONE
    # Its replacement failing too leaves no tier: the request fails with the reason.
    with session_scope(clean_db) as session:
        gave_up = stages.give_up(
            session, request_id, flow.score(other), "scorer broke", budget, settings.pool
        )
        assert gave_up == []


def _score(
    url: str, request_id: str, tier: str, settings: Settings, **escalate: object
) -> list[Step]:
    escalation = stages.Escalation(**escalate) if escalate else None  # type: ignore[arg-type]
    with session_scope(url) as session:
        outcomes = stages.score_images(
            session,
            [(request_id, tier)],
            scorer=quality_scorer(settings),
            store=ImageStore(settings.image_store),
            escalation=escalation,
        )
        return _one(outcomes[(request_id, tier)])


def test_an_answer_below_the_threshold_is_made_again_one_tier_up(
    tiny_models: dict[str, Path], clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    """The escalated image is generated and scored; the better of the two answers; the
    escalation is recorded with both qualities and paid for once."""
    request_id = submit("a lighthouse in a storm", seed=6).request_id
    (step,) = _route(clean_db, request_id, settings, _keeper(settings, cloud_ratio=0.0))
    assert step.tier == "edge"
    budget = _keeper(settings, exploration_rate=0.0, cloud_ratio=1.0)
    store = ImageStore(settings.image_store)
    _generate(clean_db, request_id, "edge", store)
    escalate = {"threshold": 1.0, "limit": 1, "budget": budget, "pool": settings.pool}
    assert _score(clean_db, request_id, "edge", settings, **escalate) == [flow.generate("cloud")]
    assert _status(clean_db, request_id) is Status.ROUTED
    assert _generate(clean_db, request_id, "cloud", store) == [flow.score("cloud")]
    assert _score(clean_db, request_id, "cloud", settings, **escalate) == []
    assert _status(clean_db, request_id) is Status.DONE
    with session_scope(clean_db) as session:
        decision = queries.get_decision(session, request_id)
        assert decision is not None and decision.escalating_to is None
        (made,) = decision.escalations
        assert (made["from"], made["to"]) == ("edge", "cloud")
        better = "cloud" if made["quality_to"] > made["quality_from"] else "edge"
        assert decision.tier == better
        quality = queries.mean_quality_of(session, request_id)
        assert made["quality_from"] == pytest.approx(quality["edge"])
        assert made["quality_to"] == pytest.approx(quality["cloud"])
    assert budget.stats()["cloud_generations"] == 1


def test_an_escalation_the_budget_refuses_leaves_the_answer(
    tiny_models: dict[str, Path], clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a lighthouse in a storm", seed=6).request_id
    budget = _keeper(settings, exploration_rate=0.0, cloud_ratio=0.0)
    _route(clean_db, request_id, settings, budget)
    _generate(clean_db, request_id, "edge", ImageStore(settings.image_store))
    escalate = {"threshold": 1.0, "limit": 1, "budget": budget, "pool": settings.pool}
    assert _score(clean_db, request_id, "edge", settings, **escalate) == []
    assert _status(clean_db, request_id) is Status.DONE
    with session_scope(clean_db) as session:
        decision = queries.get_decision(session, request_id)
        assert decision is not None and decision.escalations == []


def test_a_failed_escalation_leaves_the_answer_already_made(
    tiny_models: dict[str, Path], clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    request_id = submit("a lighthouse in a storm", seed=6).request_id
    _route(clean_db, request_id, settings, _keeper(settings, cloud_ratio=0.0))
    budget = _keeper(settings, exploration_rate=0.0, cloud_ratio=1.0)
    _generate(clean_db, request_id, "edge", ImageStore(settings.image_store))
    escalate = {"threshold": 1.0, "limit": 1, "budget": budget, "pool": settings.pool}
    assert _score(clean_db, request_id, "edge", settings, **escalate) == [flow.generate("cloud")]
    with session_scope(clean_db) as session:
        stages.give_up(session, request_id, flow.generate("cloud"), "broken", budget, settings.pool)
    assert _status(clean_db, request_id) is Status.DONE
    with session_scope(clean_db) as session:
        decision = queries.get_decision(session, request_id)
        assert decision is not None and decision.tier == "edge"
        assert decision.escalations[0]["failed"] == "broken"
