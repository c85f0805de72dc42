"""The route step: one router forward pass for a batch of prompts, the policy's ranking of
the tiers, the budget keeper's grant, and one decision per request."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from db import queries
from db.models import RoutingDecision, Status
from routing.policy import rank_tiers
from workers.app import flow
from workers.pool import Pool
from workers.services import telemetry
from workers.services.budget import BudgetKeeper
from workers.services.router import RouterService, break_ties
from workers.stages.common import Outcome, RequestGone, hand_on, live_requests

__all__ = ["route_requests"]


def _exploration(request_id: str, pool: Pool, available: Sequence[str]) -> list[str]:
    """The tiers an exploration sample is generated on beside its answer: the cheapest (the
    reference every tier's superiority is measured against) and one other, drawn per
    request; with two tiers, both. The budget keeper leaves out the answer's own."""
    others = [t for t in available if t != pool.cheapest.name]
    chosen = [pool.cheapest.name] if pool.cheapest.name in available else []
    if others:
        chosen.append(others[uuid.UUID(request_id).int % len(others)])
    return chosen


def route_requests(
    session: Session,
    request_ids: Sequence[str],
    router: RouterService,
    budget: BudgetKeeper,
    pool: Pool,
) -> dict[str, Outcome]:
    """Predict every tier's quality for a batch of prompts in one forward pass, rank the
    tiers by the policy, let the budget keeper grant each request the best it can afford,
    record one decision per request and the generation steps it needs. A redelivery finds
    the decision (the budget keeper spends at most once per request) and records nothing
    new. A tier out of service (its breaker open) is not offered."""
    requests = queries.get_requests(session, request_ids)
    live, outcomes = live_requests(requests, request_ids)
    decisions = queries.get_decisions(session, live)
    new = [rid for rid in live if rid not in decisions]
    wanted: dict[str, tuple[str, ...]] = {
        rid: queries.wanted_tiers(d) for rid, d in decisions.items()
    }
    if new:
        router.refresh(session)
        predictions = [
            break_ties(p, rid, pool)
            for rid, p in zip(
                new, router.predict_many([requests[rid].prompt for rid in new]), strict=True
            )
        ]
        tradeoff = router.tradeoff(session)
        down = queries.unavailable_tiers(session)
        rankings = [rank_tiers(p.quality, pool.costs(), tradeoff) for p in predictions]
        offered = [[t for t in ranking if t not in down] or ranking for ranking in rankings]
        explore = router.explore(new, predictions)
        grants = budget.decide_many(
            [
                (rid, available, _exploration(rid, pool, available) if candidate else [])
                for rid, available, candidate in zip(new, offered, explore, strict=True)
            ]
        )
        rows = []
        for rid, prediction, ranking, available, granted in zip(
            new, predictions, rankings, offered, grants, strict=True
        ):
            first = ranking[0]
            explored = [t for t in granted.explored if t not in down]
            # A reroute is a tier granted in place of the first that was out of service; with
            # every tier out, the whole ranking is offered and nothing is rerouted.
            rerouted = first not in available and granted.tier != first
            rows.append(
                {
                    "request_id": rid,
                    "router_version": prediction.router_version,
                    "predicted_quality": prediction.quality,
                    "predicted_metrics": prediction.metrics,
                    "tradeoff": tradeoff,
                    "wanted_tier": first,
                    "tier": granted.tier,
                    "explored": explored,
                    "spent": granted.spent,
                    "budget_reason": granted.reason,
                    "rerouted_from": first if rerouted else None,
                    "reroute_reason": f"{first} out of service: {down[first][:200]}"
                    if rerouted
                    else None,
                }
            )
            wanted[rid] = queries.tiers_wanted(granted.tier, explored)
        telemetry.record_decisions(rows)
        if queries.insert_ignore_many(session, RoutingDecision, rows) < len(rows):
            # Another worker decided some of them first: theirs stand.
            for rid, decision in queries.get_decisions(session, new).items():
                wanted[rid] = queries.wanted_tiers(decision)
    moved = queries.transition_many(
        session, live, from_status=Status.QUEUED, to_status=Status.ROUTED
    )
    # A queued request that did not move was cancelled while it was routed (the cancel holds
    # its row; db.queries.cancel) or routed by another delivery, which hands it on: either
    # way nothing follows from here. Its decision stays, as the budget was drawn for it.
    routed = [rid for rid in live if rid in moved or requests[rid].status is Status.ROUTED]
    outcomes.update({rid: RequestGone(rid) for rid in live if rid not in routed})
    handed = hand_on(
        session, {(rid, flow.ROUTE): [flow.generate(t) for t in wanted[rid]] for rid in routed}
    )
    outcomes.update({rid: handed[(rid, flow.ROUTE)] for rid in routed})
    return outcomes
