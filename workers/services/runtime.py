"""Every per-process singleton lives here: what a worker process loads once and keeps (the
diffusers pipelines per tier, the CLIP quality scorer, the active router, reloaded when a new
version is promoted) and its clients (the budget keeper, the image store)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from sqlalchemy.orm import Session

from db import queries
from routing.policy import calibrate_lambda
from routing.quality import ContrastiveQualityScorer
from routing.registry import build_router, load_router
from routing.types import PoolRouter, Router
from workers.pool import Pool
from workers.services import exploration
from workers.services.budget import BudgetKeeper, BudgetLimits, budget_keeper_from_settings
from workers.services.images import ImageStore
from workers.services.pipelines import load_clip, load_pipeline
from workers.settings import Settings, get_settings

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


# Scores that tie (a heuristic's equal word counts) are told apart by the request: a block
# of tied prompts can then be bought in part, so calibration can meet the budget inside it.
TIE_BREAK = 1e-6


def break_ties(prediction: Prediction, request_id: str, pool: Pool) -> Prediction:
    """The prediction with every dearer tier's score moved by less than ``TIE_BREAK``, by
    a draw fixed by the request id (recorded with the decision, so recent predictions, on
    which the trade-off is calibrated, carry it too)."""
    shift = TIE_BREAK * (exploration.draw(request_id + ":tie") - 0.5)
    quality = {
        tier: score + (shift if tier != pool.cheapest.name else 0.0)
        for tier, score in prediction.quality.items()
    }
    return Prediction(quality, prediction.metrics, prediction.router_version)


def answer_budget(settings: Settings) -> float:
    """The spend per request above the cheapest tier that the answers may use: the budget
    less what exploration is expected to take (its rate times the mean extra cost of an
    exploration sample, ``stages._exploration``: the cheapest tier and one other). The
    trade-off is calibrated to this, so that answers and exploration together meet the
    budget and the keeper's refusals stay the exception, not the way the budget is kept."""
    budget = BudgetLimits.from_settings(settings).budget_per_request
    pool = settings.pool
    extra = [t.cost - pool.cheapest.cost for t in pool if t.name != pool.cheapest.name]
    exploring = settings.exploration_rate * (float(np.mean(extra)) if extra else 0.0)
    return max(0.0, budget - exploring)


def pair_scores(prs: float, pool: Pool) -> dict[str, float]:
    """A two-tier router's PRS as scores of every tier: the cheapest 1/2 and the dearest
    1 - PRS (under which the policy's rule is RouteT2I's PRS < alpha, routing/policy.py), the
    tiers between spread by their rank in cost: the harder the prompt for the cheapest tier,
    the more every dearer tier is worth."""
    steps = max(len(pool) - 1, 1)
    return {tier.name: 0.5 + (0.5 - prs) * rank / steps for rank, tier in enumerate(pool)}


def model_for(tier: str, settings: Settings) -> str:
    """The diffusers pipeline (local folder or hub id) that generates a tier's images."""
    return settings.pool[tier].model


def pipeline_for(tier: str, settings: Settings) -> DiffusionPipeline:
    spec = settings.pool[tier]
    return _pipeline(
        spec.model,
        spec.device or settings.device,
        spec.torch_dtype or settings.torch_dtype,
        settings.model_revision,
    )


@lru_cache(maxsize=8)
def _pipeline(model: str, device: str, torch_dtype: str, revision: str | None) -> DiffusionPipeline:
    """One pipeline per model and placement per process (two tiers of one model at other step
    counts share it)."""
    log.info("loading the pipeline %s on %s", model, device)
    return load_pipeline(model, device=device, torch_dtype=torch_dtype, revision=revision)


def quality_scorer(settings: Settings) -> ContrastiveQualityScorer:
    return _scorer(settings.clip_model, settings.device, settings.model_revision)


@lru_cache(maxsize=1)
def _scorer(model: str, device: str, revision: str | None) -> ContrastiveQualityScorer:
    clip, processor = load_clip(model, device=device, revision=revision)
    return ContrastiveQualityScorer(clip, processor, device=device)


@dataclass(frozen=True)
class MissingModel:
    """A model a worker would load that is not where its setting points."""

    #: What needs it ("tier edge", "quality metrics (CLIP)"), the folder, and the setting.
    user: str
    path: str
    setting: str
    #: The file every model of its kind holds (model_index.json for a diffusers pipeline).
    marker: str


def missing_models(settings: Settings, queues: Sequence[str]) -> list[MissingModel]:
    """The models a worker consuming ``queues`` would load and cannot find: each tier whose
    queue is among them, and CLIP for the quality queue.

    Checked when the worker starts, so that a missing folder stops it with the reason instead
    of failing every request sent to it. Only local folders are checked: the settings make
    every local model path absolute (``resolve_model``), and what is left relative is a hub
    id, which ``from_pretrained`` fetches."""
    wanted = [
        (f"tier {tier.name}", tier.model, _model_setting(settings, tier.name), "model_index.json")
        for tier in settings.pool
        if tier.queue_name in queues
    ]
    if settings.queue_quality in queues:
        wanted.append(
            ("quality metrics (CLIP)", settings.clip_model, "T2IROUTE_CLIP_MODEL", "config.json")
        )
    return [
        MissingModel(user, path, setting, marker)
        for user, path, setting, marker in wanted
        if Path(path).is_absolute() and not (Path(path) / marker).is_file()
    ]


def _model_setting(settings: Settings, tier: str) -> str:
    if settings.tiers_file is not None:
        return f"the tier's model in {settings.tiers_file}"
    if settings.tiers is not None:
        return "the tier's model in T2IROUTE_TIERS"
    return f"T2IROUTE_{tier.upper()}_MODEL"


class RouterService:
    """The router a worker serves with. It looks for a newly promoted version at most every
    ``router_reload_seconds``, so workers pick up retrained routers without a restart."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = settings.pool
        self._budget = answer_budget(settings)
        self._full_budget = BudgetLimits.from_settings(settings).budget_per_request
        self._router: Router | PoolRouter = build_router(settings.default_policy)
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
            self._router, self._version = build_router(self.settings.default_policy), baseline
        else:
            log.info("loading router version %s from %s", active.version, active.path)
            self._router, self._version = load_router(Path(active.path)), active.version
        self._tradeoff_at = float("-inf")

    def predict_many(self, prompts: Sequence[str]) -> list[Prediction]:
        """Every tier's score for each prompt, and the per-metric D_i where the router
        predicts them, in one forward pass for the batch."""
        if not prompts:
            return []
        router = self._router
        prompts = list(prompts)
        with_metrics = getattr(router, "predict_with_metrics", None)
        if isinstance(router, PoolRouter) and not (callable(with_metrics) and len(self.pool) == 2):
            tiers = getattr(router, "tiers", self.pool.names)
            return [
                Prediction(
                    quality={t: float(v) for t, v in zip(tiers, scores, strict=True)},
                    metrics=None,
                    router_version=self._version,
                )
                for scores in router.predict_quality(prompts)
            ]
        if callable(with_metrics):
            prs_all, metrics_all = with_metrics(prompts)
            return [
                Prediction(
                    pair_scores(float(prs), self.pool),
                    [float(v) for v in metrics],
                    self._version,
                )
                for prs, metrics in zip(prs_all, metrics_all, strict=True)
            ]
        return [
            Prediction(pair_scores(float(prs), self.pool), None, self._version)
            for prs in router.predict_prs(prompts)  # type: ignore[union-attr]
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


@lru_cache(maxsize=1)
def router_service() -> RouterService:
    return RouterService(get_settings())


@lru_cache(maxsize=1)
def budget_keeper() -> BudgetKeeper:
    return budget_keeper_from_settings(get_settings())


@lru_cache(maxsize=1)
def image_store() -> ImageStore:
    return ImageStore(get_settings().image_store)
