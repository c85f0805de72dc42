"""Replay: a rated data set streamed as traffic through the real learning loop, in process.

Each prompt of the stream is a request. It goes through the real routing stage
(``workers.stages.route_requests``: the router's prediction, the calibrated policy, the
exploration choice), the real budget keeper (in process, ``LocalBudgetKeeper``) and the real
database writes, on a SQLite file. Every ``retrain_every`` requests a beat tick runs the real
retraining job (``workers.services.retraining.retrain_router``: the gate, registration, promotion)
and
the router hot-swaps to a promoted version as workers do.

**Generation is replaced by recorded ratings**: generating a (prompt, tier) reveals that
model's recorded human rating for the prompt as its quality score, instead of rendering and
scoring an image. Everything else is the code that serves.

The same stream replayed under a static policy (no exploration, no retraining) at the same
budget is the comparison: served quality, spend, and how well the trade-off keeps the budget.
"""

from __future__ import annotations

import re
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from db import queries
from db.migrate import upgrade
from db.models import Generation, GenerationRequest, QualityScore, Status
from db.session import dispose_engines, session_scope
from routing.data import RATING_METRIC
from routing.experiments import GENAI_COSTS
from routing.registry import build_router, load_pair_router
from routing.types import PoolTable, Router
from workers import stages
from workers.services.budget import budget_keeper_from_settings
from workers.services.retraining import QualitySource, held_out_apgr, retrain_router
from workers.services.router import RouterService
from workers.settings import Settings

RATINGS = QualitySource(metrics_version="recorded-rating", metrics=(RATING_METRIC,))
ORDERS = ("shuffle", "length", "switch")
# The "switch" order's second source: prompts that count, negate or compare (GenAI-Bench's
# advanced skills), after all the others.
_ADVANCED = re.compile(
    r"\b(no|not|without|none|nothing|never|more|less|fewer|than|same|different|"
    r"one|two|three|four|five|six|seven|eight|nine|ten|\d+)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ReplayConfig:
    """One replayed stream. ``models`` are GenAI-Bench models, cheapest first in cost."""

    models: tuple[str, ...] = ("SDXL_2_1", "DALLE_3")
    cloud_ratio: float = 0.3
    exploration_rate: float = 0.1
    exploration_strategy: str = "uniform"
    exploration_uniform_share: float = 0.5
    default_policy: str = "prompt_length"
    retrain_every: int = 100
    retrain_min_pairs: int = 100
    gate_min_z: float = 1.0
    learn: bool = True
    order: str = "shuffle"
    #: The data set streamed this many times, each pass in its own order: a data set of a
    #: few hundred prompts is a short stream for a loop that needs a hundred labels.
    passes: int = 3
    seed: int = 0
    batch: int = 16
    limit: int | None = None

    @property
    def name(self) -> str:
        if not self.learn:
            return f"static:{self.default_policy}"
        return f"loop:{self.exploration_strategy}"

    def static(self, policy: str) -> ReplayConfig:
        """The same stream and budget under a static policy: no exploration, no retraining."""
        return replace(self, default_policy=policy, learn=False, exploration_rate=0.0)


@dataclass
class Retraining:
    after: int
    status: str
    reason: str
    labels: int
    serving: str
    unseen_apgr: float


@dataclass
class ReplayRun:
    config: ReplayConfig
    tiers: tuple[str, ...]
    costs: np.ndarray
    #: Per request, in stream order.
    prompt_index: np.ndarray
    served: list[str]
    explored: list[tuple[str, ...]]
    quality: np.ndarray
    spend: np.ndarray
    #: What the budget keeper charged: the spend above the cheapest tier, explorations included.
    extra_spend: np.ndarray
    refused: np.ndarray
    tradeoff: np.ndarray
    router_version: list[str]
    retrainings: list[Retraining] = field(default_factory=list)
    #: Figures read back from the database after the run, for reconciliation.
    database: dict[str, float] = field(default_factory=dict)

    @property
    def budget_per_request(self) -> float:
        """The extra spend per request above the cheapest tier the budget allows."""
        return self.config.cloud_ratio * float(self.costs.max() - self.costs.min())

    @property
    def labels(self) -> int:
        return sum(1 for e in self.explored if e)

    def exploration_spend(self) -> float:
        cost = dict(zip(self.tiers, self.costs, strict=True))
        return float(sum(cost[t] for tiers in self.explored for t in tiers))


def tier_name(model: str) -> str:
    return model.lower()


def stream_order(prompts: Sequence[str], order: str, seed: int) -> np.ndarray:
    """Indices of the prompts in the order they arrive: shuffled by ``seed``; from the
    shortest prompt to the longest (drift in one direction); or all plain prompts first and
    then the ones that count, negate or compare (a sudden switch of source)."""
    shuffled = np.random.default_rng(seed).permutation(len(prompts))
    if order == "shuffle":
        return shuffled
    if order == "length":
        return shuffled[np.argsort([len(prompts[i]) for i in shuffled], kind="stable")]
    if order == "switch":
        advanced = np.array([bool(_ADVANCED.search(prompts[i])) for i in shuffled])
        return np.concatenate([shuffled[~advanced], shuffled[advanced]])
    raise ValueError(f"unknown order {order!r}; one of {', '.join(ORDERS)}")


def replay_settings(
    config: ReplayConfig, workdir: Path, database_url: str | None = None
) -> Settings:
    tiers = [
        {
            "name": tier_name(m),
            "model": f"recorded:{m}",
            "cost": GENAI_COSTS[m],
            "queue": f"replay-{tier_name(m)}",
        }
        for m in config.models
    ]
    return Settings(
        database_url=database_url or f"sqlite:///{workdir / 'replay.db'}",
        broker_url="memory://",
        budget_backend="local",
        tiers=tiers,
        tiers_file=None,
        model_store=workdir / "routers",
        cloud_ratio=config.cloud_ratio,
        budget_per_request=None,
        cloud_rate_per_second=None,
        exploration_rate=config.exploration_rate,
        exploration_strategy=config.exploration_strategy,  # type: ignore[arg-type]
        exploration_uniform_share=config.exploration_uniform_share,
        default_policy=config.default_policy,
        router_reload_seconds=0.0,
        retrain_min_pairs=config.retrain_min_pairs,
        gate_min_z=config.gate_min_z,
        escalation_threshold=None,
    )


def _serving_router(settings: Settings) -> tuple[str, Router]:
    with session_scope(settings.database_url) as session:
        active = queries.active_router_version(session)
        if active is not None:
            return active.version, load_pair_router(Path(active.path))
    return f"baseline:{settings.default_policy}", build_router(settings.default_policy)


def run_replay(
    config: ReplayConfig,
    table: PoolTable,
    workdir: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    database_url: str | None = None,
) -> ReplayRun:
    """Stream ``table``'s prompts through the loop (the module docstring says how), on a
    SQLite file in ``workdir`` or on the empty database at ``database_url``."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="t2iroute-replay-") as tmp:
            return run_replay(config, table, Path(tmp), on_batch, database_url)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = replay_settings(config, workdir, database_url)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        if queries.status_counts(session):
            raise ValueError("a replay needs an empty database: it counts every row as its own")
    pool = settings.pool
    tiers = pool.names
    column = {tier_name(m): table.tiers.index(m) for m in config.models}
    ratings = table.quality[:, :, 0]
    costs = np.array([t.cost for t in pool])
    router = RouterService(settings)
    keeper = budget_keeper_from_settings(settings)
    order = np.concatenate(
        [
            stream_order(table.prompts, config.order, config.seed * 1000 + p)
            for p in range(config.passes)
        ]
    )
    if config.limit is not None:
        order = order[: config.limit]
    rng = np.random.default_rng(config.seed)
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in order]
    n = len(order)
    run = ReplayRun(
        config=config,
        tiers=tiers,
        costs=costs,
        prompt_index=order,
        served=[],
        explored=[],
        quality=np.zeros(n),
        spend=np.zeros(n),
        extra_spend=np.zeros(n),
        refused=np.zeros(n, dtype=bool),
        tradeoff=np.zeros(n),
        router_version=[],
    )
    since_tick = 0
    for start in range(0, len(order), config.batch):
        batch = list(range(start, min(start + config.batch, len(order))))
        batch_ids = [ids[k] for k in batch]
        with session_scope(settings.database_url) as session:
            session.add_all(
                GenerationRequest(
                    id=ids[k], prompt=table.prompts[order[k]], width=64, height=64, seed=0
                )
                for k in batch
            )
            session.flush()
            stages.route_requests(session, batch_ids, router, keeper, pool)
            decisions = queries.get_decisions(session, batch_ids)
            for k, rid in zip(batch, batch_ids, strict=True):
                decision = decisions[rid]
                made = (decision.tier, *decision.explored)
                for tier in made:
                    rating = float(ratings[order[k], column[tier]])
                    generation = Generation(
                        request_id=rid,
                        tier=tier,
                        model=pool[tier].model,
                        image_path="(recorded rating)",
                        latency_ms=0.0,
                    )
                    session.add(generation)
                    session.flush()
                    session.add(
                        QualityScore(
                            generation_id=generation.id,
                            request_id=rid,
                            tier=tier,
                            metrics_version=RATINGS.metrics_version,
                            scores={"names": list(RATINGS.metrics), "values": [rating]},
                            mean_score=rating,
                        )
                    )
                run.served.append(decision.tier)
                run.explored.append(tuple(decision.explored))
                run.quality[k] = ratings[order[k], column[decision.tier]]
                run.spend[k] = sum(pool[t].cost for t in made)
                run.extra_spend[k] = decision.spent
                run.refused[k] = decision.budget_reason != "granted"
                run.tradeoff[k] = decision.tradeoff
                run.router_version.append(decision.router_version)
            queries.transition_many(
                session, batch_ids, from_status=Status.ROUTED, to_status=Status.DONE
            )
        since_tick += len(batch)
        if config.learn and since_tick >= config.retrain_every:
            since_tick = 0
            labelled = {int(order[j]) for j in range(batch[-1] + 1) if run.explored[j]}
            run.retrainings.append(_tick(settings, table, labelled, batch[-1] + 1, column, config))
        if on_batch is not None:
            on_batch(len(batch))
    run.database = _read_back(settings)
    dispose_engines()
    return run


def _tick(
    settings: Settings,
    table: PoolTable,
    labelled: set[int],
    seen: int,
    column: dict[str, int],
    config: ReplayConfig,
) -> Retraining:
    """A beat tick: retrain, then score the serving router on every prompt of the data set
    that no label has come from yet (none of its versions was trained on them)."""
    result = retrain_router(settings, seed=config.seed, source=RATINGS, actor="replay")
    serving, router = _serving_router(settings)
    unseen = np.array(sorted(set(range(len(table.prompts))) - labelled), dtype=np.int64)
    apgr = float("nan")
    if len(unseen) >= 20:
        cheap, dear = (column[tier_name(m)] for m in (config.models[0], config.models[-1]))
        pairs = table.pair(table.tiers[cheap], table.tiers[dear]).take(unseen)
        apgr = held_out_apgr(pairs, router)
    return Retraining(seen, result.status, result.reason, result.n_pairs, serving, apgr)


def _read_back(settings: Settings) -> dict[str, float]:
    """What the database says happened: for checking the run's own accounting."""
    with session_scope(settings.database_url) as session:
        cost = {t.name: t.cost for t in settings.pool}
        generated = queries.generations_by_tier(session)
        return {
            "requests": float(queries.count_requests(session)),
            "spend": float(sum(cost[tier] * n for tier, n in generated.items())),
            "explored": float(queries.count_explored_decisions(session)),
            "labelled_pairs": float(
                len(
                    queries.labelled_pairs(
                        session,
                        RATINGS.metrics_version,
                        settings.pool.cheapest.name,
                        settings.pool.tiers[-1].name,
                    )
                )
            ),
            "router_versions": float(queries.count_router_versions(session)),
            "promoted_events": float(queries.count_router_events(session, "promoted")),
            "refused_events": float(queries.count_router_events(session, "refused")),
        }
