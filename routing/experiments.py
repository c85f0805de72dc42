"""The evaluation experiments on GenAI-Bench, shared by ``t2iroute eval`` and the benchmarks:
the edge/cloud pairs of the pair reports, the pools and their cost table, and the encoders the
learned routers read."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from routing.encodings import SharedEncoding
from routing.evaluate import Experiment
from routing.pool_evaluate import PoolExperiment
from routing.registry import PAIR_ROUTERS
from routing.reports import REFERENCE_ROUTER

if TYPE_CHECKING:
    from routing.routet2i import RouteT2IConfig

GENAI_PAIRS = (
    "SDXL_2_1:DALLE_3",
    "SDXL_Turbo:DALLE_3",
    "SDXL_2_1:Midjourney_6",
    "SDXL_Turbo:Midjourney_6",
    "SDXL_2_1:SDXL_Base",
)
GENAI_CROSS = ("SDXL_2_1:DALLE_3/SDXL_Turbo:Midjourney_6",)

# Relative cost per image, SD 2.1 = 1 (docs/evaluation.md, "Cost table", says where each
# figure comes from). The dear end follows public per-image prices, the open models their
# compute per image on one GPU.
GENAI_COSTS: dict[str, float] = {
    "SDXL_Turbo": 0.5,
    "SDXL_2_1": 1.0,
    "SDXL_Base": 3.0,
    "DeepFloyd_I_XL_v1": 6.0,
    "Midjourney_6": 15.0,
    "DALLE_3": 20.0,
}

# Pools by name: tiers cheapest first (the first is RouteT2I's reference tier).
GENAI_POOLS: dict[str, tuple[str, ...]] = {
    "six": (
        "SDXL_Turbo",
        "SDXL_2_1",
        "SDXL_Base",
        "DeepFloyd_I_XL_v1",
        "Midjourney_6",
        "DALLE_3",
    ),
    "three": ("SDXL_2_1", "SDXL_Base", "DALLE_3"),
}


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_pair(text: str) -> tuple[str, str]:
    parts = re.split(r"->|:", text)
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"expected EDGE:CLOUD, got {text!r}")
    return parts[0], parts[1]


def pair_name(edge: str, cloud: str) -> str:
    return f"{edge}->{cloud}"


def genai_bench_experiments(pairs: str, cross: str, data: Path | None = None) -> list[Experiment]:
    """Same-pair experiments for ``EDGE:CLOUD,...`` and cross-pair ones for
    ``TRAIN_EDGE:TRAIN_CLOUD/TEST_EDGE:TEST_CLOUD,...``, each table loaded once."""
    from routing.data import load_genai_bench

    tables = {}
    experiments = []
    for edge, cloud in (parse_pair(p) for p in split_list(pairs)):
        tables[(edge, cloud)] = load_genai_bench(edge, cloud, data)
        experiments.append(Experiment.same_pair(pair_name(edge, cloud), tables[(edge, cloud)]))
    for spec in split_list(cross):
        train_text, _, test_text = spec.partition("/")
        train_pair, test_pair = parse_pair(train_text), parse_pair(test_text)
        for pair in (train_pair, test_pair):
            if pair not in tables:
                tables[pair] = load_genai_bench(*pair, data)
        name = f"{pair_name(*train_pair)} => {pair_name(*test_pair)}"
        experiments.append(Experiment(name, tables[train_pair], tables[test_pair]))
    return experiments


def parse_costs(text: str, base: Mapping[str, float] = GENAI_COSTS) -> dict[str, float]:
    """``MODEL=COST,...`` over ``base``: the cost table with the named entries replaced."""
    costs = dict(base)
    for item in split_list(text):
        model, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected MODEL=COST, got {item!r}")
        costs[model.strip()] = float(value)
    return costs


def parse_pools(text: str) -> dict[str, tuple[str, ...]]:
    """``NAME,...`` of ``GENAI_POOLS`` or ``NAME=MODEL+MODEL+...`` for a pool of one's own."""
    pools = {}
    for item in split_list(text):
        name, sep, models = item.partition("=")
        pools[name.strip()] = (
            tuple(m.strip() for m in models.split("+") if m.strip()) if sep else _known_pool(name)
        )
    if not pools:
        raise ValueError("no pool given")
    return pools


def genai_bench_pool_experiments(
    pools: Mapping[str, Sequence[str]],
    costs: Mapping[str, float] = GENAI_COSTS,
    data: Path | None = None,
) -> list[PoolExperiment]:
    """One pool experiment per name -> models; the tiers are ordered by cost, so the
    reference tier is the cheapest."""
    from routing.data import load_genai_bench_pool

    experiments = []
    for name, models in pools.items():
        missing = [m for m in models if m not in costs]
        if missing:
            raise ValueError(f"no cost for {missing}; give it with MODEL=COST")
        ordered = tuple(sorted(models, key=lambda m: costs[m]))
        table = load_genai_bench_pool(ordered, data)
        experiments.append(PoolExperiment(name, table, tuple(costs[m] for m in ordered)))
    return experiments


def _known_pool(name: str) -> tuple[str, ...]:
    try:
        return GENAI_POOLS[name]
    except KeyError:
        raise ValueError(f"unknown pool {name!r}; known: {', '.join(GENAI_POOLS)}") from None


def encodings(
    encoder: str | None, layer: int | None, routers: Sequence[str] = PAIR_ROUTERS
) -> tuple[SharedEncoding, RouteT2IConfig]:
    """The baselines' shared encoding and RouteT2I's config for a chosen encoder and layer.

    The encoder is loaded here, so a path that does not load fails before any training; so is
    RouteT2I's layer when RouteT2I is among ``routers`` (an out-of-range layer is then a bad
    option, not a crash in the first fold). Both come from ``shared_encoder``'s per-process
    cache, which the routers read again at fit time, so nothing is loaded twice.
    """
    from routing.routet2i import RouteT2IConfig, shared_encoder

    config = RouteT2IConfig(encoder=encoder)
    if layer is not None:
        config = dataclasses.replace(config, encoder_layer=layer)
    pooled = shared_encoder(config.encoder, config.encoder_revision, config.max_length)
    if REFERENCE_ROUTER in routers:
        c = config
        shared_encoder(c.encoder, c.encoder_revision, c.max_length, c.encoder_layer)
    return SharedEncoding(pooled), config
