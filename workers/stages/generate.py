"""The generate step: which (request, tier) pairs still need an image, the images rendered
in batches, and each recorded once and handed on to scoring."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from db import queries
from db.models import Generation, GenerationRequest
from workers.app import flow
from workers.services import telemetry
from workers.services.images import ImageStore, StoreUnavailable
from workers.services.pipelines import generate_many
from workers.services.runtime import model_for, pipeline_for
from workers.settings import Settings
from workers.stages.common import Key, RequestGone, hand_on, live_requests

__all__ = ["NewImage", "complete_generations", "generation_jobs", "render"]


def generation_jobs(
    session: Session, keys: Sequence[Key]
) -> dict[Key, GenerationRequest | RequestGone | None]:
    """For each (request, tier): the request to render, None when its image exists already,
    or why there is nothing to do (the request is gone or was not routed to the tier)."""
    ids = list(dict.fromkeys(rid for rid, _ in keys))
    requests = queries.get_requests(session, ids)
    live, gone = live_requests(requests, ids)
    decisions = queries.get_decisions(session, live)
    made = queries.get_generations(session, live, [tier for _, tier in keys])
    jobs: dict[Key, GenerationRequest | RequestGone | None] = {}
    for rid, tier in keys:
        decision = decisions.get(rid)
        if rid in gone:
            jobs[(rid, tier)] = RequestGone(rid)
        elif decision is None or tier not in queries.wanted_tiers(decision):
            jobs[(rid, tier)] = RequestGone(f"{rid} was not routed to {tier}")
        else:
            jobs[(rid, tier)] = None if (rid, tier) in made else requests[rid]
    return jobs


@dataclass(frozen=True)
class NewImage:
    model: str
    image_path: str
    latency_ms: float
    worker: str


def render(
    jobs: Mapping[Key, GenerationRequest], settings: Settings, store: ImageStore, worker: str
) -> dict[Key, NewImage]:
    """Each job's image, in one diffusers call per tier and set of generation parameters
    (size, steps, guidance), at most the tier's ``max_batch`` prompts a call. When the image
    store gives out, the images written before have no rows: they are removed, and made again
    with the rest when the outage is retried."""
    groups: dict[tuple[str, int, int, int, float | None], list[Key]] = {}
    for (request_id, tier), job in jobs.items():
        spec = settings.pool[tier]
        guidance = job.guidance_scale if job.guidance_scale is not None else spec.guidance_scale
        steps = job.steps or spec.steps or settings.default_steps
        groups.setdefault((tier, job.width, job.height, steps, guidance), []).append(
            (request_id, tier)
        )
    images: dict[Key, NewImage] = {}
    try:
        for (tier, width, height, steps, guidance), keys in groups.items():
            size = settings.pool[tier].max_batch or settings.generate_batch_size
            for chunk in (keys[i : i + size] for i in range(0, len(keys), size)):
                started = time.perf_counter()
                pictures = generate_many(
                    pipeline_for(tier, settings),
                    [jobs[key].prompt for key in chunk],
                    [jobs[key].seed for key in chunk],
                    width=width,
                    height=height,
                    steps=steps,
                    guidance_scale=guidance,
                )
                # What each request waited for: the whole call.
                latency_ms = (time.perf_counter() - started) * 1000.0
                for (request_id, _), picture in zip(chunk, pictures, strict=True):
                    images[(request_id, tier)] = NewImage(
                        model=model_for(tier, settings),
                        image_path=store.save(request_id, tier, picture),
                        latency_ms=latency_ms,
                        worker=worker,
                    )
    except StoreUnavailable as exc:
        telemetry.record_store_outage(exc)
        for image in images.values():
            store.remove(image.image_path)
        raise
    return images


def complete_generations(
    session: Session, images: Mapping[Key, NewImage | None]
) -> dict[Key, list[flow.Step]]:
    """Record the rendered images (once each) and hand each tier on to scoring."""
    rows = [
        {
            "request_id": rid,
            "tier": tier,
            "model": image.model,
            "image_path": image.image_path,
            "latency_ms": image.latency_ms,
            "worker": image.worker,
        }
        for (rid, tier), image in images.items()
        if image is not None
    ]
    queries.insert_ignore_many(session, Generation, rows)
    telemetry.observe_generations(rows)
    for tier in sorted({tier for (_, tier), image in images.items() if image is not None}):
        queries.record_tier_success(session, tier)
    handed = hand_on(
        session,
        {(rid, flow.generate(tier)): [flow.score(tier)] for rid, tier in images},
    )
    return {(rid, tier): handed[(rid, flow.generate(tier))] for rid, tier in images}
