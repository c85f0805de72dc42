"""Every per-process singleton lives here: what a worker process loads once and keeps (the
diffusers pipelines per tier, the CLIP quality scorer, the router service) and its clients (the
budget keeper, the image store); and the check, when a worker starts, that the models it would
load are there."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from routing.quality import ContrastiveQualityScorer
from workers.services.budget import BudgetKeeper, budget_keeper_from_settings
from workers.services.images import ImageStore
from workers.services.pipelines import load_clip, load_pipeline
from workers.services.router import RouterService
from workers.settings import Settings

log = logging.getLogger(__name__)


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


T = TypeVar("T")

# The clients built from a settings object, kept while the process runs: every caller passes
# the settings it was given (a worker process has one object, read once), and gets the same
# client for the same object.
_BUILT: dict[tuple[str, int], tuple[Settings, Any]] = {}


def _built(kind: str, settings: Settings, build: Callable[[Settings], T]) -> T:
    key = (kind, id(settings))
    if key not in _BUILT:
        # The settings are held beside their client, so that their id is never reused.
        _BUILT[key] = (settings, build(settings))
    client: T = _BUILT[key][1]
    return client


def router_service(settings: Settings) -> RouterService:
    return _built("router", settings, RouterService)


def budget_keeper(settings: Settings) -> BudgetKeeper:
    return _built("budget", settings, budget_keeper_from_settings)


def image_store(settings: Settings) -> ImageStore:
    return _built("images", settings, lambda s: ImageStore(s.image_store))
