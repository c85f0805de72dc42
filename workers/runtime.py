"""Every per-process singleton lives here: what a worker process loads once and keeps (the
diffusers pipelines per tier, the CLIP quality scorer, the active router, reloaded when a new
version is promoted) and its clients (the budget keeper, the image store)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from sqlalchemy.orm import Session

from db import queries
from db.models import Tier
from routing.calibrate import calibrate_alpha
from routing.quality import ContrastiveQualityScorer
from routing.registry import build_router, load_router
from routing.types import Router
from workers.budget import BudgetKeeper, budget_keeper_from_settings
from workers.images import ImageStore
from workers.pipelines import load_clip, load_pipeline
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Below this many recent predictions the calibrated threshold is noise: use the policy's
# neutral threshold and let the budget keeper hold the ratio.
MIN_CALIBRATION_SAMPLE = 20
NEUTRAL_ALPHA = 0.5


@dataclass(frozen=True)
class Prediction:
    prs: float
    metrics: list[float] | None
    router_version: str


def model_for(tier: Tier, settings: Settings) -> str:
    """The diffusers pipeline (local folder or hub id) that generates a tier's images."""
    return settings.edge_model if tier is Tier.EDGE else settings.cloud_model


@lru_cache(maxsize=2)
def pipeline_for(tier: Tier, settings: Settings) -> DiffusionPipeline:
    model = model_for(tier, settings)
    log.info("loading %s pipeline from %s", tier.value, model)
    return load_pipeline(
        model,
        device=settings.device,
        torch_dtype=settings.torch_dtype,
        revision=settings.model_revision,
    )


@lru_cache(maxsize=1)
def quality_scorer(settings: Settings) -> ContrastiveQualityScorer:
    model, processor = load_clip(
        settings.clip_model, device=settings.device, revision=settings.model_revision
    )
    return ContrastiveQualityScorer(model, processor, device=settings.device)


class RouterService:
    """The router a worker serves with. It looks for a newly promoted version at most every
    ``router_reload_seconds``, so workers pick up retrained routers without a restart."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._router: Router = build_router(settings.default_policy)
        self._version = f"baseline:{settings.default_policy}"
        self._checked_at = float("-inf")
        self._alpha = NEUTRAL_ALPHA
        self._alpha_at = float("-inf")

    @property
    def version(self) -> str:
        return self._version

    def refresh(self, session: Session) -> None:
        if time.monotonic() - self._checked_at < self.settings.router_reload_seconds:
            return
        self._checked_at = time.monotonic()
        active = queries.active_router_version(session)
        if active is None or active.version == self._version:
            return
        log.info("loading router version %s from %s", active.version, active.path)
        self._router = load_router(Path(active.path))
        self._version = active.version
        self._alpha_at = float("-inf")

    def predict(self, prompt: str) -> Prediction:
        """PRS, and the per-metric D_i where the router predicts them, in one forward pass."""
        with_metrics = getattr(self._router, "predict_with_metrics", None)
        if not callable(with_metrics):
            prs = float(self._router.predict_prs([prompt])[0])
            return Prediction(prs=prs, metrics=None, router_version=self._version)
        prs_all, metrics_all = with_metrics([prompt])
        return Prediction(
            prs=float(prs_all[0]),
            metrics=[float(v) for v in metrics_all[0]],
            router_version=self._version,
        )

    def alpha(self, session: Session) -> float:
        """Threshold calibrated so that about rho of recent requests would want the cloud
        (RouteLLM-style); the budget keeper is the hard guarantee behind it."""
        if time.monotonic() - self._alpha_at >= self.settings.router_reload_seconds:
            recent = queries.recent_predicted_prs(
                session, self.settings.calibration_window, router_version=self._version
            )
            self._alpha = (
                calibrate_alpha(np.asarray(recent), self.settings.cloud_ratio)
                if len(recent) >= MIN_CALIBRATION_SAMPLE
                else NEUTRAL_ALPHA
            )
            self._alpha_at = time.monotonic()
        return self._alpha


@lru_cache(maxsize=1)
def router_service() -> RouterService:
    return RouterService(get_settings())


@lru_cache(maxsize=1)
def budget_keeper() -> BudgetKeeper:
    return budget_keeper_from_settings(get_settings())


@lru_cache(maxsize=1)
def image_store() -> ImageStore:
    return ImageStore(get_settings().image_store)
