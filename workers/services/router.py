"""The router a worker serves with (``RouterService``): the active version, reloaded when a new
one is promoted; every tier's score for a batch of prompts (``Prediction``) from the router's
one serving method; and the trade-off lambda calibrated on its recent predictions so that the
answers meet the budget. The policy itself is ``routing.policy``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from db import queries
from routing import policy
from routing.policy import calibrate_lambda
from routing.registry import build_router, load_router
from routing.types import TierScorer
from workers.pool import Pool
from workers.services import exploration
from workers.services.budget import BudgetLimits
from workers.settings import Settings

log = logging.getLogger(__name__)

# Below this many recent predictions the calibrated tradeoff is noise: use lambda = 0 (the
# neutral threshold alpha = 1/2 of two tiers) and let the budget keeper hold the spend.
MIN_CALIBRATION_SAMPLE = 20
NEUTRAL_TRADEOFF = 0.0


@dataclass(frozen=True)
class Prediction:
    """The router's score of every tier of the pool (higher is better), and RouteT2I's
    per-metric D_i where it predicts them."""

    quality: dict[str, float]
    metrics: list[float] | None
    router_version: str


def break_ties(prediction: Prediction, request_id: str, pool: Pool) -> Prediction:
    """The prediction with its ties broken by the request's own draw (``policy.break_ties``;
    recorded with the decision, so recent predictions, on which the trade-off is calibrated,
    carry it too)."""
    draw = exploration.draw(request_id + ":tie")
    quality = policy.break_ties(prediction.quality, draw, pool.cheapest.name)
    return Prediction(quality, prediction.metrics, prediction.router_version)


def answer_budget(settings: Settings) -> float:
    """The spend per request above the cheapest tier that the answers may use: the budget
    less what exploration is expected to take (its rate times the mean extra cost of an
    exploration sample, ``stages.route._exploration``: the cheapest tier and one other). The
    trade-off is calibrated to this, so that answers and exploration together meet the
    budget and the keeper's refusals stay the exception, not the way the budget is kept."""
    budget = BudgetLimits.from_settings(settings).budget_per_request
    pool = settings.pool
    extra = [t.cost - pool.cheapest.cost for t in pool if t.name != pool.cheapest.name]
    exploring = settings.exploration_rate * (float(np.mean(extra)) if extra else 0.0)
    return max(0.0, budget - exploring)


def _serving(router: object) -> TierScorer:
    if not isinstance(router, TierScorer):
        raise TypeError(f"{type(router).__name__} cannot serve: it has no predict_tier_quality")
    return router


class RouterService:
    """The router a worker serves with. It looks for a newly promoted version at most every
    ``router_reload_seconds``, so workers pick up retrained routers without a restart."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = settings.pool
        self._budget = answer_budget(settings)
        self._full_budget = BudgetLimits.from_settings(settings).budget_per_request
        self._router = _serving(build_router(settings.default_policy))
        self._version = f"baseline:{settings.default_policy}"
        self._checked_at = float("-inf")
        self._tradeoff = NEUTRAL_TRADEOFF
        self._tradeoff_at = float("-inf")
        self._explore_below = math.inf

    @property
    def version(self) -> str:
        return self._version

    def refresh(self, session: Session) -> None:
        if time.monotonic() - self._checked_at < self.settings.router_reload_seconds:
            return
        self._checked_at = time.monotonic()
        active = queries.active_router_version(session)
        # No version active any more (a rollback past the first one): the default policy.
        baseline = f"baseline:{self.settings.default_policy}"
        if (active.version if active is not None else baseline) == self._version:
            return
        if active is None:
            log.info("no router version is active: back to %s", baseline)
            self._router = _serving(build_router(self.settings.default_policy))
            self._version = baseline
        else:
            log.info("loading router version %s from %s", active.version, active.path)
            self._router, self._version = _serving(load_router(Path(active.path))), active.version
        self._tradeoff_at = float("-inf")

    def predict_many(self, prompts: Sequence[str]) -> list[Prediction]:
        """Every tier's score for each prompt, and the per-metric D_i where the router
        predicts them, in one forward pass for the batch."""
        if not prompts:
            return []
        scored = self._router.predict_tier_quality(list(prompts), self.pool.names)
        metrics = scored.metrics if scored.metrics is not None else [None] * len(scored.quality)
        return [
            Prediction(
                quality={t: float(v) for t, v in zip(scored.tiers, scores, strict=True)},
                metrics=None if row is None else [float(v) for v in row],
                router_version=self._version,
            )
            for scores, row in zip(scored.quality, metrics, strict=True)
        ]

    def tradeoff(self, session: Session) -> float:
        """Lambda calibrated on this router's recent predictions so that their choices spend
        the budget per request (RouteLLM-style calibration, generalised to a pool); the budget
        keeper is the hard guarantee behind it.

        The target is corrected by what the recent decisions really spent: a calibration on
        the last window's prompts is late when the prompt mix drifts, and a block of tied
        predictions can only be bought whole, so on its own it can sit well under (or over)
        the budget for long stretches. Adding the window's shortfall to the target (an
        integral correction over the window) brings the spend back to the budget."""
        if time.monotonic() - self._tradeoff_at >= self.settings.router_reload_seconds:
            names = self.pool.names
            recent = [
                [row[t] for t in names]
                for row in queries.recent_predictions(
                    session, self.settings.calibration_window, router_version=self._version
                )
                if all(t in row for t in names)
            ]
            self._tradeoff = (
                calibrate_lambda(
                    np.asarray(recent), [t.cost for t in self.pool], self._target(session)
                )
                if len(recent) >= MIN_CALIBRATION_SAMPLE
                else NEUTRAL_TRADEOFF
            )
            self._explore_below = exploration.margin_threshold(
                exploration.margins(
                    [dict(zip(names, row, strict=True)) for row in recent],
                    self.pool,
                    self._tradeoff,
                ),
                self.settings.exploration_rate,
                self.settings.exploration_uniform_share,
            )
            self._tradeoff_at = time.monotonic()
        return self._tradeoff

    def _target(self, session: Session) -> float:
        """The answers' budget plus the recent decisions' shortfall against the whole budget
        (explorations included), between none and twice the budget."""
        count, spent = queries.recent_spend(session, self.settings.calibration_window)
        if count < MIN_CALIBRATION_SAMPLE:
            return self._budget
        full = self._full_budget
        return min(max(0.0, self._budget + full - spent), 2.0 * full)

    def explore(self, request_ids: Sequence[str], predictions: Sequence[Prediction]) -> list[bool]:
        """Whether each request is offered an exploration token (workers/services/exploration.py),
        at the trade-off of the last ``tradeoff`` call."""
        settings = self.settings
        return exploration.candidates(
            request_ids,
            exploration.margins([p.quality for p in predictions], self.pool, self._tradeoff),
            strategy=settings.exploration_strategy,
            exploration_rate=settings.exploration_rate,
            share=settings.exploration_uniform_share,
            threshold=self._explore_below,
        )
