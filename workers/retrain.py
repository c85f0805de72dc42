"""The periodic retraining job: train a candidate RouteT2I router on the labelled pairs the
exploration sample produced, compare it with the active router on held-out pairs, register
it, and promote it only if it routes better. Router workers pick the promoted version up
without a restart (``workers.runtime.RouterService.refresh``)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from db import queries
from db.models import RouterVersion
from db.session import session_scope
from routing.data import scalar_quality
from routing.evaluate import kfold_indices, score_routing
from routing.metrics import METRIC_NAMES, METRICS_VERSION
from routing.registry import build_router, load_pair_router, save_router
from routing.routet2i import RouteT2IConfig, RouteT2IRouter
from routing.types import PairTable, Router
from workers.settings import Settings

log = logging.getLogger(__name__)

# One fold in four is held out: the candidate and the incumbent are compared on pairs that
# neither was trained on.
FOLDS = 4


@dataclass(frozen=True)
class RetrainResult:
    status: str  # "skipped", "registered" or "promoted"
    reason: str
    n_pairs: int
    version: str | None = None
    candidate_apgr: float | None = None
    incumbent_apgr: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_table(rows: list[tuple[str, list[float], list[float]]]) -> PairTable:
    return PairTable(
        prompts=tuple(prompt for prompt, _, _ in rows),
        edge=np.array([edge for _, edge, _ in rows], dtype=np.float64),
        cloud=np.array([cloud for _, _, cloud in rows], dtype=np.float64),
        metrics=METRIC_NAMES,
    )


def held_out_apgr(test: PairTable, router: Router) -> float:
    """The share of the cloud's quality gain the router recovers on ``test``, averaged over
    cloud shares from 0 to 1 (RouteLLM's APGR); 0 when the held-out pairs show no gain."""
    edge, cloud = scalar_quality(test)
    apgr = score_routing(router.predict_prs(test.prompts), edge, cloud)[2]
    return 0.0 if np.isnan(apgr) else apgr


def _incumbent(session: Session, settings: Settings, train: PairTable) -> tuple[str, Router]:
    """The router serving now: the active version, or the fitted default baseline policy."""
    active = queries.active_router_version(session)
    if active is not None:
        return active.version, load_pair_router(Path(active.path))
    baseline = build_router(settings.default_policy)
    baseline.fit(train)
    return f"baseline:{settings.default_policy}", baseline


def retrain_router(settings: Settings, *, seed: int = 0) -> RetrainResult:
    with session_scope(settings.database_url) as session:
        # The pair router learns the pool's cheapest tier against its dearest.
        pool = settings.pool
        rows = queries.training_pairs(
            session, METRICS_VERSION, pool.cheapest.name, pool.tiers[-1].name
        )
    if len(rows) < settings.retrain_min_pairs:
        return RetrainResult(
            "skipped", f"{len(rows)} pairs, fewer than {settings.retrain_min_pairs}", len(rows)
        )
    table = pair_table(rows)
    test_idx = kfold_indices(len(table), FOLDS, seed)[0]
    train = table.take(np.setdiff1d(np.arange(len(table)), test_idx))
    test = table.take(test_idx)

    candidate = RouteT2IRouter(RouteT2IConfig(encoder=settings.router_encoder, seed=seed))
    candidate.fit(train)
    candidate_apgr = held_out_apgr(test, candidate)

    with session_scope(settings.database_url) as session:
        incumbent_version, incumbent = _incumbent(session, settings, train)
    incumbent_apgr = held_out_apgr(test, incumbent)

    version = candidate.version
    path = settings.model_store / version
    save_router(candidate, path)
    evaluation = {
        "held_out_pairs": len(test),
        "apgr": candidate_apgr,
        "incumbent": incumbent_version,
        "incumbent_apgr": incumbent_apgr,
    }
    better = candidate_apgr > incumbent_apgr
    with session_scope(settings.database_url) as session:
        queries.insert_ignore(
            session,
            RouterVersion,
            {
                "version": version,
                "kind": candidate.kind,
                "path": str(path.resolve()),
                "n_train_pairs": len(train),
                "evaluation": evaluation,
            },
        )
        if better:
            registered = queries.router_version(session, version)
            assert registered is not None
            queries.promote_router_version(session, registered.id)
    log.info(
        "router %s: held-out APGR %.3f vs %s %.3f (%s)",
        version,
        candidate_apgr,
        incumbent_version,
        incumbent_apgr,
        "promoted" if better else "kept the incumbent",
    )
    return RetrainResult(
        "promoted" if better else "registered",
        f"held-out APGR {candidate_apgr:.3f} vs {incumbent_version} {incumbent_apgr:.3f}",
        len(rows),
        version,
        candidate_apgr,
        incumbent_apgr,
    )
