"""Labelled pairs written straight into the database, as the exploration path leaves them:
for the retraining tests."""

from __future__ import annotations

import uuid

import numpy as np

from db.models import Generation, GenerationRequest, QualityScore, Status
from db.session import session_scope
from routing.metrics import METRIC_NAMES, METRICS_VERSION


def seed_training_pairs(url: str, n: int) -> None:
    """Labelled pairs in which the cloud wins exactly on prompts about crowds: a pattern
    the RouteT2I router can learn and the noun-count baseline cannot rank as well."""
    rng = np.random.default_rng(0)
    subjects = ("cat", "tree", "lamp", "cup", "chair", "boat", "apple", "clock")
    with session_scope(url) as session:
        for i in range(n):
            crowd = i % 2 == 0
            prompt = (
                f"a crowd of people around the {subjects[i % len(subjects)]}"
                if crowd
                else f"a {subjects[i % len(subjects)]} with a hat, a scarf, a bag and a book"
            )
            request_id = str(uuid.uuid4())
            session.add(
                GenerationRequest(
                    id=request_id,
                    prompt=prompt,
                    width=64,
                    height=64,
                    steps=1,
                    seed=i,
                    status=Status.DONE,
                )
            )
            session.flush()
            edge = rng.uniform(0.4, 0.6, len(METRIC_NAMES))
            # The cloud gains on crowds far more than it loses elsewhere, so every held-out
            # fold has a gain to recover (APGR is undefined on a fold without one).
            cloud = edge + (0.3 if crowd else -0.05) + rng.normal(0, 0.02, len(METRIC_NAMES))
            for tier, values in (("edge", edge), ("cloud", cloud)):
                generation = Generation(
                    request_id=request_id,
                    tier=tier,
                    model="tiny",
                    image_path=f"{request_id}/{tier}.png",
                    latency_ms=1.0,
                )
                session.add(generation)
                session.flush()
                session.add(
                    QualityScore(
                        generation_id=generation.id,
                        request_id=request_id,
                        tier=tier,
                        metrics_version=METRICS_VERSION,
                        scores={"names": list(METRIC_NAMES), "values": values.tolist()},
                        mean_score=float(values.mean()),
                    )
                )
