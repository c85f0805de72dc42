"""One registry of routers by name (after RouteLLM's ``ROUTER_CLS``): how each router is built,
whether it routes a pair of tiers, a pool or both, and which class saves and loads it where it
persists. The pair and pool harnesses, ``t2iroute eval``, the benchmarks and the workers all
take their names from ``REGISTRY``; the router classes are imported only when one is built or
loaded, so a worker serving a heuristic needs neither torch nor an encoder."""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, cast

from routing.encodings import SharedEncoding
from routing.types import (
    PairTable,
    PersistentPoolRouter,
    PersistentRouter,
    PoolRouter,
    PoolTable,
    Router,
)

if TYPE_CHECKING:
    from routing.routet2i import RouteT2IConfig

MANIFEST = "router.json"

Interface = Literal["pair", "pool"]
INTERFACES: tuple[Interface, ...] = ("pair", "pool")


@dataclass
class BuildContext:
    """What a builder may use: the seed of the router's own randomness, the encodings that the
    routers of one run share (a fresh ``SharedEncoding`` on first use when none is given; the
    encoder itself is cached per process), RouteT2I's config (its defaults when None) and, for
    the oracle alone, the labelled test table."""

    seed: int = 0
    shared: SharedEncoding | None = None
    routet2i_config: RouteT2IConfig | None = None
    test: PairTable | PoolTable | None = None

    @functools.cached_property
    def encodings(self) -> SharedEncoding:
        return self.shared if self.shared is not None else SharedEncoding()


PairBuilder = Callable[[BuildContext], Router]
PoolBuilder = Callable[[BuildContext], PoolRouter]


@dataclass(frozen=True)
class RouterEntry:
    """One router: its builders, and per interface the ``module:Class`` that saves and loads
    it. An interface it builds without a saving class is evaluation only, for the reason in
    ``evaluation_only``."""

    name: str
    pair: PairBuilder | None = None
    pool: PoolBuilder | None = None
    artefacts: Mapping[Interface, str] = field(default_factory=dict)
    evaluation_only: str = ""

    def __post_init__(self) -> None:
        built = self.interfaces
        if not built:
            raise ValueError(f"{self.name}: a router needs a pair or a pool builder")
        if not set(self.artefacts) <= set(built):
            raise ValueError(f"{self.name}: saves an interface it does not build")
        if set(self.artefacts) != set(built) and not self.evaluation_only:
            raise ValueError(f"{self.name}: say why the interfaces it does not save are offline")

    @property
    def interfaces(self) -> tuple[Interface, ...]:
        builders = {"pair": self.pair, "pool": self.pool}
        return tuple(i for i in INTERFACES if builders[i] is not None)


Labels = TypeVar("Labels", PairTable, PoolTable)


def _oracle_labels(context: BuildContext, kind: type[Labels]) -> Labels:
    if not isinstance(context.test, kind):
        raise ValueError(
            f"the oracle reads the labels of the prompts it routes: it needs a {kind.__name__} "
            "of test labels and only ever serves an evaluation"
        )
    return context.test


# Builders. Each imports its module when called, so that the registry itself stays light.


def _random(c: BuildContext) -> Router:
    from routing.baselines import RandomRouter

    return RandomRouter(seed=c.seed)


def _random_pool(c: BuildContext) -> PoolRouter:
    from routing.pool_baselines import RandomPoolRouter

    return RandomPoolRouter(seed=c.seed)


def _prompt_length(c: BuildContext) -> Router:
    from routing.baselines import PromptLengthRouter

    return PromptLengthRouter()


def _prompt_length_pool(c: BuildContext) -> PoolRouter:
    from routing.pool_baselines import PromptLengthPoolRouter

    return PromptLengthPoolRouter()


def _noun_count(c: BuildContext) -> Router:
    from routing.baselines import NounCountRouter

    return NounCountRouter()


def _bert_classifier(c: BuildContext) -> Router:
    from routing.bert_router import BertClassifierRouter

    shared = c.encodings
    return BertClassifierRouter(shared.encoder, inputs=shared.top_layer, seed=c.seed)


def _sw_ranking(c: BuildContext) -> Router:
    from routing.embedding_baselines import SimilarityRankingRouter

    return SimilarityRankingRouter(c.encodings.pooled)


def _knn(c: BuildContext) -> PoolRouter:
    from routing.pool_baselines import KnnQualityRouter

    return KnnQualityRouter(c.encodings.pooled)


def _ridge(c: BuildContext) -> PoolRouter:
    from routing.pool_baselines import RidgeQualityRouter

    return RidgeQualityRouter(c.encodings.pooled)


def _tfidf_ridge(c: BuildContext) -> PoolRouter:
    from routing.pool_baselines import TfidfRidgeRouter

    return TfidfRidgeRouter()


def _matrix_factorisation(c: BuildContext) -> Router:
    from routing.embedding_baselines import MatrixFactorisationRouter

    return MatrixFactorisationRouter(c.encodings.pooled, seed=c.seed)


def _matrix_factorisation_pool(c: BuildContext) -> PoolRouter:
    from routing.pool_baselines import MatrixFactorisationPoolRouter

    return MatrixFactorisationPoolRouter(c.encodings.pooled, seed=c.seed)


def _zooter(c: BuildContext) -> Router:
    from routing.embedding_baselines import ZooterRouter

    return ZooterRouter(c.encodings.pooled, seed=c.seed)


def _routet2i(c: BuildContext) -> Router:
    from routing.routet2i import RouteT2IRouter

    # Its own encoder layer (routing.routet2i.shared_encoder keeps one memo per process).
    return RouteT2IRouter(c.routet2i_config, seed=c.seed)


def _routet2i_pool(c: BuildContext) -> PoolRouter:
    from routing.routet2i import RouteT2IRouter

    return RouteT2IRouter(c.routet2i_config, seed=c.seed)


def _oracle(c: BuildContext) -> Router:
    from routing.baselines import OracleRouter

    return OracleRouter(_oracle_labels(c, PairTable))


def _oracle_pool(c: BuildContext) -> PoolRouter:
    from routing.pool_baselines import OraclePoolRouter

    return OraclePoolRouter(_oracle_labels(c, PoolTable))


_OFFLINE_BASELINE = "a baseline compared offline only; nothing saves its fitted state"

# The order is the order of the reports' rows: the pair harness and the pool harness each keep
# the routers they can run, in this order.
REGISTRY: dict[str, RouterEntry] = {
    e.name: e
    for e in (
        RouterEntry(
            "random",
            pair=_random,
            pool=_random_pool,
            artefacts={"pair": "routing.baselines:RandomRouter"},
            evaluation_only="the pool's random router is the chance line of the pool reports",
        ),
        RouterEntry(
            "prompt_length",
            pair=_prompt_length,
            pool=_prompt_length_pool,
            artefacts={
                "pair": "routing.baselines:PromptLengthRouter",
                "pool": "routing.pool_baselines:PromptLengthPoolRouter",
            },
        ),
        RouterEntry(
            "noun_count",
            pair=_noun_count,
            artefacts={"pair": "routing.baselines:NounCountRouter"},
        ),
        RouterEntry("bert_classifier", pair=_bert_classifier, evaluation_only=_OFFLINE_BASELINE),
        RouterEntry("sw_ranking", pair=_sw_ranking, evaluation_only=_OFFLINE_BASELINE),
        RouterEntry(
            "knn", pool=_knn, artefacts={"pool": "routing.pool_baselines:KnnQualityRouter"}
        ),
        RouterEntry(
            "ridge", pool=_ridge, artefacts={"pool": "routing.pool_baselines:RidgeQualityRouter"}
        ),
        RouterEntry(
            "tfidf_ridge",
            pool=_tfidf_ridge,
            artefacts={"pool": "routing.pool_baselines:TfidfRidgeRouter"},
        ),
        RouterEntry(
            "matrix_factorisation",
            pair=_matrix_factorisation,
            pool=_matrix_factorisation_pool,
            artefacts={"pool": "routing.pool_baselines:MatrixFactorisationPoolRouter"},
            evaluation_only=f"the pair variant is {_OFFLINE_BASELINE}",
        ),
        RouterEntry("zooter", pair=_zooter, evaluation_only=_OFFLINE_BASELINE),
        RouterEntry(
            "routet2i",
            pair=_routet2i,
            pool=_routet2i_pool,
            # One class serves both: its saved document records the tiers it routes.
            artefacts={
                "pair": "routing.routet2i:RouteT2IRouter",
                "pool": "routing.routet2i:RouteT2IRouter",
            },
        ),
        RouterEntry(
            "oracle",
            pair=_oracle,
            pool=_oracle_pool,
            evaluation_only="the upper bound: it reads the test labels, so it never serves",
        ),
    )
}

PAIR_ROUTERS: tuple[str, ...] = tuple(n for n, e in REGISTRY.items() if e.pair is not None)
POOL_ROUTERS: tuple[str, ...] = tuple(n for n, e in REGISTRY.items() if e.pool is not None)


def router_entry(name: str) -> RouterEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(REGISTRY)}") from None


def build_router(name: str, context: BuildContext | None = None) -> Router:
    """A fresh, untrained pair router (two tiers: ``predict_prs``)."""
    entry = router_entry(name)
    if entry.pair is None:
        raise ValueError(f"{name} routes pools only; pair routers: {', '.join(PAIR_ROUTERS)}")
    return entry.pair(context if context is not None else BuildContext())


def build_pool_router(name: str, context: BuildContext | None = None) -> PoolRouter:
    """A fresh, untrained pool router (any number of tiers: ``predict_quality``)."""
    entry = router_entry(name)
    if entry.pool is None:
        raise ValueError(f"{name} routes pairs only; pool routers: {', '.join(POOL_ROUTERS)}")
    return entry.pool(context if context is not None else BuildContext())


def saved_as(router: object) -> tuple[str, Interface]:
    """The registry name and interface under which ``router``'s class is saved."""
    spec = f"{type(router).__module__}:{type(router).__qualname__}"
    for entry in REGISTRY.values():
        for interface, artefact in entry.artefacts.items():
            if artefact == spec:
                return entry.name, interface
    raise ValueError(f"{type(router).__name__} is evaluation only: the registry does not save it")


def save_router(router: PersistentRouter | PersistentPoolRouter, path: Path) -> None:
    """The router's own artefacts and a manifest naming its registry entry and interface."""
    name, interface = saved_as(router)
    path.mkdir(parents=True, exist_ok=True)
    router.save(path)
    manifest = {"kind": name, "interface": interface, "name": router.name}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_router(path: Path) -> PersistentRouter | PersistentPoolRouter:
    manifest = json.loads((path / MANIFEST).read_text())
    # Versions saved before pools existed are pair routers and name no interface.
    interface = manifest.get("interface", "pair")
    entry = router_entry(manifest["kind"])
    try:
        module_name, class_name = entry.artefacts[interface].split(":")
    except KeyError:
        raise ValueError(f"{entry.name} saves no {interface} router") from None
    cls = getattr(importlib.import_module(module_name), class_name)
    return cast(type[PersistentRouter] | type[PersistentPoolRouter], cls).load(path)


def load_pair_router(path: Path) -> PersistentRouter:
    """A saved router that routes a pair of tiers (``predict_prs``)."""
    router = load_router(path)
    if not isinstance(router, PersistentRouter):
        raise ValueError(f"the router saved in {path} routes a pool, not a pair")
    return router
