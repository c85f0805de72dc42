"""Tune RouteT2I's defaults on development pairs and seeds only (never the report's seeds 0-4).

Every variant is scored with ``routing.evaluate.cross_validate`` on the same folds as the
baselines, and the mean Delta P@50% per pair is printed.

Run: ``python bench/routet2i_tuning.py --variant base: --variant rank:rank_loss=1.0 ...``
(pairs SDXL_2_1->DALLE_3 and SDXL_Turbo->Midjourney_6, seeds 100-102, by default; ``--pairs``
and ``--cross`` take the same forms as ``t2iroute eval genai-bench``; ``--encoder`` puts every
router on another encoder, RouteT2I's layer then set per variant with ``encoder_layer=N``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import time
from typing import Any

import torch

from routing.evaluate import (
    FoldContext,
    RouterFactory,
    cross_validate,
    router_factories,
    summarise,
)
from routing.experiments import encodings, genai_bench_experiments
from routing.registry import PAIR_ROUTERS, BuildContext, build_router
from routing.routet2i import RouteT2IConfig
from routing.types import Router

DEV_PAIRS = "SDXL_2_1:DALLE_3,SDXL_Turbo:Midjourney_6"
DEV_SEEDS = (100, 101, 102)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, spec = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = ast.literal_eval(value)
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    parser.add_argument(
        "--baselines",
        default="sw_ranking,prompt_length",
        help=f"comma-separated pair routers of the registry: {', '.join(PAIR_ROUTERS)}",
    )
    parser.add_argument("--seeds", default=",".join(map(str, DEV_SEEDS)))
    parser.add_argument("--pairs", default=DEV_PAIRS, help="EDGE:CLOUD,...")
    parser.add_argument("--cross", default="", help="TRAIN_E:TRAIN_C/TEST_E:TEST_C,...")
    parser.add_argument("--encoder", default=None, help="encoder of every router (default MiniLM)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    baselines = [b for b in args.baselines.split(",") if b]
    shared, base = encodings(args.encoder, None, baselines)
    factories: dict[str, RouterFactory] = dict(router_factories(baselines, shared))
    for text in args.variant:
        name, overrides = parse_variant(text)

        config = dataclasses.replace(base, **overrides)

        def make(c: FoldContext, config: RouteT2IConfig = config) -> Router:
            return build_router("routet2i", BuildContext(c.seed, shared, config, c.test))

        factories[name] = make
    experiments = genai_bench_experiments(args.pairs, args.cross)
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    scores = cross_validate(experiments, factories, seeds=seeds)
    wall = time.perf_counter() - started
    table: dict[str, dict[str, float]] = {}
    for s in summarise(scores):
        table.setdefault(s.router, {})[s.experiment] = s.delta_p50[0]
    names = [e.name for e in experiments]
    print(f"{'router':<24}" + "".join(f"{n:>28}" for n in names) + f"{'mean':>8}")
    for router, row in table.items():
        values = [row[n] for n in names]
        cells = "".join(f"{v:>28.1f}" for v in values)
        print(f"{router:<24}{cells}{sum(values) / len(values):>8.1f}")
    print(f"wall {wall:.0f}s")


if __name__ == "__main__":
    main()
