"""The periodic retraining job and its promotion gate.

A candidate RouteT2I router is trained on the labelled pairs that exploration produced (the
pool's cheapest tier against its dearest), registered, and promoted only when the gate
finds it better on labels it was not trained on:

* **held out:** every label is predicted by a candidate fitted on the other folds
  (``FOLDS``-fold out-of-fold predictions), so all labels serve as test data and no fold
  without a quality gap can decide alone;
* **unbiased:** the gate scores on the uniform slice of the labels only
  (``workers.services.exploration``): with ``margin`` exploration the rest were chosen for being
  hard, and would bias the estimate;
* **beyond noise:** the candidate's APGR must exceed the cold-start policy's (the default
  policy, fitted on the same folds) by ``gate_min_z`` standard errors of a paired bootstrap
  over the slice, and exceed the serving router's APGR. The serving router may have been
  trained on some of these labels, which only favours it: the comparison is conservative.

Whatever the verdict, the candidate refitted on every label is saved and registered, with a
``registered`` and a ``promoted`` or ``refused`` event (``db.models.RouterEvent``), so an
operator can inspect it and promote it by hand (``t2iroute models promote``); a promotion
is ``workers.services.router_versions.promote``, the operator's own. All database
writes happen in one transaction after the files are saved: a run that fails anywhere leaves
the serving version as it was. Router workers pick a promoted version up without a restart
(``workers.services.router.RouterService.refresh``). Runs are serialised by ``retrain_lock``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis
from redis.exceptions import LockNotOwnedError
from sqlalchemy.orm import Session

from db import queries
from db.models import RouterEvent, RouterVersion
from db.session import session_scope
from routing.data import scalar_quality
from routing.evaluate import kfold_indices, score_routing
from routing.metrics import METRIC_NAMES, METRICS_VERSION
from routing.registry import build_router, load_pair_router, save_router
from routing.routet2i import RouteT2IConfig, RouteT2IRouter
from routing.types import PairTable, Router
from workers.services.exploration import in_uniform_slice
from workers.services.router_versions import baseline_version, promote
from workers.settings import Settings

log = logging.getLogger(__name__)

FOLDS = 4
# Paired bootstrap rounds for the gate's standard error.
BOOTSTRAP_ROUNDS = 200
# Fewer uniform-slice labels than this and the gate does not judge.
MIN_EVALUATION_LABELS = 12
LOCK_NAME = "t2iroute:retrain:lock"


@dataclass(frozen=True)
class QualitySource:
    """Which scores are the labels: the quality worker's CLIP metrics, or the recorded
    ratings a replay reveals (``workers.offline.replay``)."""

    metrics_version: str = METRICS_VERSION
    metrics: tuple[str, ...] = METRIC_NAMES


CLIP_METRICS = QualitySource()


@dataclass(frozen=True)
class GateVerdict:
    promote: bool
    reason: str
    n_evaluated: int
    candidate_apgr: float
    cold_start_apgr: float
    incumbent: str
    incumbent_apgr: float
    #: (candidate - cold start) / its bootstrap standard error.
    z: float


@dataclass(frozen=True)
class RetrainResult:
    status: str  # "skipped", "refused", "promoted"
    reason: str
    n_pairs: int
    version: str | None = None
    candidate_apgr: float | None = None
    incumbent_apgr: float | None = None
    cold_start_apgr: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_table(
    rows: list[tuple[str, list[float], list[float]]], metrics: tuple[str, ...] = METRIC_NAMES
) -> PairTable:
    return PairTable(
        prompts=tuple(prompt for prompt, _, _ in rows),
        edge=np.array([edge for _, edge, _ in rows], dtype=np.float64),
        cloud=np.array([cloud for _, _, cloud in rows], dtype=np.float64),
        metrics=metrics,
    )


def held_out_apgr(test: PairTable, router: Router) -> float:
    """The share of the cloud's quality gain the router recovers on ``test``, averaged over
    cloud shares from 0 to 1 (RouteLLM's APGR); 0 when the held-out pairs show no gain."""
    edge, cloud = scalar_quality(test)
    apgr = score_routing(router.predict_prs(test.prompts), edge, cloud)[2]
    return 0.0 if np.isnan(apgr) else apgr


def out_of_fold_prs(
    table: PairTable, make: Callable[[], Router], folds: int, seed: int
) -> np.ndarray:
    """Each pair's PRS from a router fitted on the other folds."""
    prs = np.empty(len(table), dtype=np.float64)
    for test_idx in kfold_indices(len(table), folds, seed):
        router = make()
        router.fit(table.take(np.setdiff1d(np.arange(len(table)), test_idx)))
        prs[test_idx] = router.predict_prs([table.prompts[i] for i in test_idx])
    return prs


def _apgr(prs: np.ndarray, edge: np.ndarray, cloud: np.ndarray) -> float:
    return float(score_routing(prs, edge, cloud)[2])


def paired_bootstrap_se(
    prs_a: np.ndarray, prs_b: np.ndarray, edge: np.ndarray, cloud: np.ndarray, seed: int
) -> float:
    """Standard error of APGR(a) - APGR(b) over resamples of the same pairs for both."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(BOOTSTRAP_ROUNDS):
        idx = rng.integers(0, len(edge), len(edge))
        diff = _apgr(prs_a[idx], edge[idx], cloud[idx]) - _apgr(prs_b[idx], edge[idx], cloud[idx])
        if np.isfinite(diff):
            diffs.append(diff)
    return float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("inf")


def judge(
    table: PairTable,
    evaluate: np.ndarray,
    candidate: Callable[[], Router],
    cold_start: Callable[[], Router],
    incumbent: tuple[str, Router | None],
    *,
    min_z: float,
    seed: int,
) -> GateVerdict:
    """The gate's verdict on a candidate (the module docstring says how)."""
    edge, cloud = scalar_quality(table)
    cand = out_of_fold_prs(table, candidate, FOLDS, seed)
    cold = out_of_fold_prs(table, cold_start, FOLDS, seed)
    name, serving = incumbent
    # The serving router is a fitted version, or (None) the cold-start policy itself.
    inc = cold if serving is None else np.asarray(serving.predict_prs(table.prompts), float)
    e, c = edge[evaluate], cloud[evaluate]
    cand_apgr, cold_apgr = _apgr(cand[evaluate], e, c), _apgr(cold[evaluate], e, c)
    inc_apgr = _apgr(inc[evaluate], e, c)
    n = int(evaluate.sum())

    def verdict(promote: bool, reason: str, z: float = float("nan")) -> GateVerdict:
        return GateVerdict(promote, reason, n, cand_apgr, cold_apgr, name, inc_apgr, z)

    if n < MIN_EVALUATION_LABELS:
        return verdict(False, f"{n} uniform-slice labels, fewer than {MIN_EVALUATION_LABELS}")
    if not np.isfinite(cand_apgr) or not np.isfinite(cold_apgr):
        return verdict(False, "the held-out labels show no quality gain to recover")
    se = paired_bootstrap_se(cand[evaluate], cold[evaluate], e, c, seed)
    z = (cand_apgr - cold_apgr) / se if se > 0 else float("inf") * np.sign(cand_apgr - cold_apgr)
    if not z > min_z:
        return verdict(
            False,
            f"APGR {cand_apgr:.3f} vs cold start {cold_apgr:.3f}: {z:.2f} standard errors, "
            f"not above {min_z:g}",
            z,
        )
    if not cand_apgr > inc_apgr:
        return verdict(False, f"APGR {cand_apgr:.3f} not above {name}'s {inc_apgr:.3f}", z)
    return verdict(
        True,
        f"APGR {cand_apgr:.3f} vs cold start {cold_apgr:.3f} ({z:.2f} standard errors) "
        f"and {name} {inc_apgr:.3f}",
        z,
    )


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: an undefined figure is stored as null."""
    return float(value) if np.isfinite(value) else None


def _incumbent(session: Session, settings: Settings) -> tuple[str, Router | None]:
    active = queries.active_router_version(session)
    if active is not None:
        return active.version, load_pair_router(Path(active.path))
    return baseline_version(settings.default_policy), None


def retrain_router(
    settings: Settings,
    *,
    seed: int = 0,
    source: QualitySource = CLIP_METRICS,
    actor: str = "retrain",
) -> RetrainResult:
    pool = settings.pool
    with session_scope(settings.database_url) as session:
        rows = queries.labelled_pairs(
            session, source.metrics_version, pool.cheapest.name, pool.tiers[-1].name
        )
        incumbent = _incumbent(session, settings)
    if len(rows) < settings.retrain_min_pairs:
        return RetrainResult(
            "skipped", f"{len(rows)} pairs, fewer than {settings.retrain_min_pairs}", len(rows)
        )
    table = pair_table([(p, e, c) for _, p, e, c in rows], source.metrics)
    evaluate = np.array(
        [
            in_uniform_slice(
                rid,
                settings.exploration_strategy,
                settings.exploration_rate,
                settings.exploration_uniform_share,
            )
            for rid, _, _, _ in rows
        ]
    )

    def candidate() -> RouteT2IRouter:
        return RouteT2IRouter(RouteT2IConfig(encoder=settings.router_encoder, seed=seed))

    verdict = judge(
        table,
        evaluate,
        candidate,
        lambda: build_router(settings.default_policy),
        incumbent,
        min_z=settings.gate_min_z,
        seed=seed,
    )
    final = candidate()
    final.fit(table)
    version = final.version
    path = settings.model_store / version
    save_router(final, path)
    evaluation = {
        "labels": len(table),
        "evaluated": verdict.n_evaluated,
        "apgr": _finite(verdict.candidate_apgr),
        "cold_start": baseline_version(settings.default_policy),
        "cold_start_apgr": _finite(verdict.cold_start_apgr),
        "z": _finite(verdict.z),
        "incumbent": verdict.incumbent,
        "incumbent_apgr": _finite(verdict.incumbent_apgr),
        "verdict": verdict.reason,
    }
    event = RouterEvent.PROMOTED if verdict.promote else RouterEvent.REFUSED
    with session_scope(settings.database_url) as session:
        queries.insert_ignore(
            session,
            RouterVersion,
            {
                "version": version,
                "kind": final.kind,
                "path": str(path.resolve()),
                "n_train_pairs": len(table),
                "evaluation": evaluation,
            },
        )
        queries.record_router_event(
            session,
            version,
            RouterEvent.REGISTERED,
            actor=actor,
            reason=f"trained on {len(table)} labelled pairs",
            details=evaluation,
        )
        if verdict.promote:
            registered = queries.router_version(session, version)
            assert registered is not None
            promote(session, registered, actor=actor, reason=verdict.reason, details=evaluation)
        else:
            queries.record_router_event(
                session, version, event, actor=actor, reason=verdict.reason, details=evaluation
            )
    log.info("router %s: %s (%s)", version, event.value, verdict.reason)
    return RetrainResult(
        event.value,
        verdict.reason,
        len(rows),
        version,
        verdict.candidate_apgr,
        verdict.incumbent_apgr,
        verdict.cold_start_apgr,
    )


@contextmanager
def retrain_lock(settings: Settings) -> Iterator[bool]:
    """Holds the retraining lock while the block runs; yields False, holding nothing, when
    another run has it. The lock expires a minute after the run's hard time limit, so a
    holder that died (a killed worker, a lost host) blocks the next beat tick at most."""
    client = Redis.from_url(settings.redis_url)
    lock = client.lock(LOCK_NAME, timeout=settings.retrain_time_limit + 60, blocking=False)
    acquired = bool(lock.acquire())
    try:
        yield acquired
    finally:
        if acquired:
            with suppress(LockNotOwnedError):  # it expired under a run past its limit
                lock.release()
        client.close()
