"""Quick held-out check of RouteT2I against a baseline (prompt length unless ``--baseline``
names another pair router of ``routing.registry``) on GenAI-Bench.

Delta P@50%: route the half of each held-out fold with the lowest predicted PRS to the cloud;
the gain in mean quality over edge-only, as a percentage of the cloud-only gain. Ties at the
cut are split in expectation (each tied prompt counts with the share of the block that fits),
which is what a random tie-break gives on average. Folds are K-fold splits of the prompts,
reshuffled per seed; every router sees the same folds.

Run: ``python bench/routet2i_sanity.py [--edge SDXL_2_1 --cloud DALLE_3] [--set epochs=30 ...]``.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from routing.data import load_genai_bench, scalar_quality
from routing.registry import PAIR_ROUTERS, BuildContext, build_router
from routing.routet2i import RouteT2IConfig
from routing.types import PairTable, Router


def delta_p(score: np.ndarray, edge: np.ndarray, cloud: np.ndarray, share: float) -> float:
    """Gain of routing the ``share`` lowest-scored prompts, in % of the cloud-only gain."""
    gain = cloud - edge
    budget = share * len(score)
    routed = 0.0
    total = 0.0
    for value in np.unique(score):
        block = gain[score == value]
        take = min(len(block), budget - routed)
        if take <= 0:
            break
        total += take * block.mean()
        routed += take
    return float(100.0 * total / gain.sum())


def folds(n: int, k: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(n)
    for part in np.array_split(order, k):
        yield np.setdiff1d(order, part), part


def evaluate(
    make: Callable[[int], Router], table: PairTable, k: int, seeds: list[int], share: float
) -> list[float]:
    edge, cloud = scalar_quality(table)
    results = []
    for seed in seeds:
        for train, test in folds(len(table), k, seed):
            router = make(seed)
            router.fit(table.take(train))
            score = router.predict_prs(table.take(test).prompts)
            results.append(delta_p(score, edge[test], cloud[test], share))
    return results


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", default="SDXL_2_1")
    parser.add_argument("--cloud", default="DALLE_3")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="RouteT2IConfig overrides k=v")
    parser.add_argument("--baseline", default="prompt_length", choices=PAIR_ROUTERS)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    table = load_genai_bench(args.edge, args.cloud)
    seeds = list(range(args.seeds))
    config = RouteT2IConfig(**parse_overrides(args.set))  # type: ignore[arg-type]
    print(f"{args.edge} -> {args.cloud}, {len(table)} prompts, {args.folds}-fold x {seeds}")
    print(f"config: {config}")

    routers: dict[str, Callable[[int], Router]] = {
        "routet2i": lambda seed: build_router(
            "routet2i", BuildContext(seed=seed, routet2i_config=config)
        ),
    }
    if not args.skip_baseline:
        routers[args.baseline] = lambda seed: build_router(
            args.baseline, BuildContext(seed=seed, test=table)
        )
    results = {}
    for name, make in routers.items():
        began = time.perf_counter()
        results[name] = evaluate(make, table, args.folds, seeds, args.share)
        print(
            f"{name:15s} Delta P@{args.share:.0%} = {summary(results[name])}"
            f"  [{time.perf_counter() - began:.0f} s]"
        )
    if args.baseline in results:
        paired = [a - b for a, b in zip(results["routet2i"], results[args.baseline], strict=True)]
        wins = sum(d > 0 for d in paired)
        print(f"routet2i - {args.baseline}, paired over folds: {summary(paired)}, ", end="")
        print(f"ahead on {wins} of {len(paired)} folds")


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) / len(values) ** 0.5
    return f"{statistics.fmean(values):6.1f} +- {spread:4.1f} (s.e.)"


if __name__ == "__main__":
    main()
