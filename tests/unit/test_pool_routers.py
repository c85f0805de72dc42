"""Routers that score every tier of a pool, RouteT2I on a pool, and the pool harness and CLI, on
a tiny random BERT and a three-tier table where the prompt decides the best tier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routing.embedding_baselines import FitSettings, PooledEmbeddings
from routing.encoder import FrozenTextEncoder
from routing.encodings import SharedEncoding
from routing.policy import choose_tiers
from routing.pool_baselines import (
    KnnQualityRouter,
    MatrixFactorisationPoolRouter,
    OraclePoolRouter,
    PromptLengthPoolRouter,
    RandomPoolRouter,
    RidgeQualityRouter,
    TfidfRidgeRouter,
)
from routing.pool_evaluate import (
    PoolExperiment,
    cost_to_reach,
    cross_validate_pool,
    frontier_quality,
    pool_references,
    pool_router_factories,
    single_frontier,
    summarise_pool,
)
from routing.registry import load_router, save_router
from routing.routet2i import RouteT2IConfig, RouteT2IRouter
from routing.types import PoolRouter, PoolTable
from tests.unit.test_baselines import hard_mask, word_table
from tests.unit.tiny_text_encoder import build_tiny_encoder
from workers.entrypoints.cli.eval import eval_app

TIERS = ("cheap", "mid", "dear")
COSTS = np.array([1.0, 3.0, 20.0])


def word_pool() -> PoolTable:
    """Easy prompts: the mid tier is best (3.5 against 3.0 and 3.2); with a castle or a dragon
    the dear tier is (4.0 against 2.0 and 2.5)."""
    prompts = word_table().prompts
    hard = hard_mask(prompts)
    quality = np.where(hard[:, None], [2.0, 2.5, 4.0], [3.0, 3.5, 3.2])[:, :, None]
    return PoolTable(prompts, quality, TIERS, ("rating",))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> FrozenTextEncoder:
    torch.set_num_threads(1)
    return FrozenTextEncoder(build_tiny_encoder(tmp_path_factory.mktemp("encoder")))


@pytest.fixture(scope="module")
def split() -> tuple[PoolTable, PoolTable]:
    table = word_pool()
    order = np.random.default_rng(0).permutation(len(table))
    return table.take(order[:200]), table.take(order[200:])


def best_tier_accuracy(router: PoolRouter, test: PoolTable) -> float:
    choice = choose_tiers(router.predict_quality(test.prompts), COSTS, 0.0)
    return float(np.mean(choice == test.quality[:, :, 0].argmax(axis=1)))


def upgrade_auc(predicted: np.ndarray, prompts: tuple[str, ...]) -> float:
    """AUC of "castle or dragon" against the predicted gain of the dear tier over the mid one:
    1/2 for a score unrelated to the rule."""
    gain, hard = predicted[:, 2] - predicted[:, 1], hard_mask(prompts)
    return float(np.mean(gain[hard][:, None] > gain[~hard][None, :]))


FAST_T2I = RouteT2IConfig(epochs=30, lr=1e-2, rank=8, score_dim=8, ensemble=1)


def learned(kind: str, encoder: FrozenTextEncoder) -> PoolRouter:
    pooled = PooledEmbeddings(encoder)
    routers: dict[str, PoolRouter] = {
        "knn": KnnQualityRouter(pooled, k=5),
        "ridge": RidgeQualityRouter(pooled, alpha=0.1),
        "tfidf_ridge": TfidfRidgeRouter(alpha=0.1),
        "matrix_factorisation": MatrixFactorisationPoolRouter(
            pooled, dim=16, fit=FitSettings(epochs=60, lr=1e-2)
        ),
        "routet2i": RouteT2IRouter(FAST_T2I, encoder=encoder),
    }
    return routers[kind]


@pytest.mark.parametrize(
    "kind", ["knn", "ridge", "tfidf_ridge", "matrix_factorisation", "routet2i"]
)
def test_learned_pool_routers_find_the_best_tier(
    kind: str, encoder: FrozenTextEncoder, split: tuple[PoolTable, PoolTable]
) -> None:
    train, test = split
    router = learned(kind, encoder)
    assert isinstance(router, PoolRouter)
    with pytest.raises(RuntimeError, match="not fitted"):
        router.predict_quality(test.prompts)
    router.fit(train)
    predicted = router.predict_quality(test.prompts)
    assert predicted.shape == (len(test), len(TIERS))
    assert upgrade_auc(predicted, test.prompts) > 0.75, kind


def test_prompt_blind_routers_and_the_oracle(split: tuple[PoolTable, PoolTable]) -> None:
    train, test = split
    random = RandomPoolRouter(seed=3)
    random.fit(train)
    first = random.predict_quality(test.prompts)
    np.testing.assert_array_equal(first[:5], random.predict_quality(test.prompts[:5]))
    assert first.shape == (len(test), 3) and not np.allclose(first, first[0])
    oracle = OraclePoolRouter(test)
    assert best_tier_accuracy(oracle, test) == 1.0
    with pytest.raises(KeyError):
        oracle.predict_quality(["an unseen prompt"])


def test_prompt_length_fits_a_line_per_tier() -> None:
    prompts = tuple(" ".join(["cat"] * n) for n in range(1, 21))
    words = np.arange(1, 21, dtype=np.float64)
    quality = np.stack([4.0 - 0.1 * words, 2.0 + 0.1 * words], axis=1)[:, :, None]
    router = PromptLengthPoolRouter()
    router.fit(PoolTable(prompts, quality, ("a", "b"), ("rating",)))
    np.testing.assert_allclose(
        router.predict_quality(["cat cat", "cat " * 30]), [[3.8, 2.2], [1.0, 5.0]], atol=1e-9
    )


def test_routet2i_on_a_pair_pool_is_the_pair_router(encoder: FrozenTextEncoder) -> None:
    pair = word_table()
    on_pair = RouteT2IRouter(FAST_T2I, encoder=encoder, epochs=3)
    on_pool = RouteT2IRouter(FAST_T2I, encoder=encoder, epochs=3)
    on_pair.fit(pair)
    on_pool.fit(pair.pool())
    prompts = list(pair.prompts[:40])
    prs = on_pair.predict_prs(prompts)
    np.testing.assert_array_equal(on_pool.predict_prs(prompts), prs)
    quality = on_pair.predict_quality(prompts)
    np.testing.assert_array_equal(quality, np.stack([np.full_like(prs, 0.5), 1 - prs], axis=1))
    assert on_pair.version == on_pool.version


def test_routet2i_pool_heads_per_tier_save_and_load(
    encoder: FrozenTextEncoder, split: tuple[PoolTable, PoolTable], tmp_path: Path
) -> None:
    train, test = split
    router = RouteT2IRouter(FAST_T2I, encoder=encoder, epochs=3)
    router.fit(train)
    prs, distance = router.predict_tiers(test.prompts)
    assert prs.shape == (len(test), 2) and distance.shape == (len(test), 2, 1)
    assert router.tiers == TIERS and len(router.tier_params) == 2
    with pytest.raises(ValueError, match="pool of 3 tiers"):
        router.predict_prs(test.prompts)
    save_router(router, tmp_path / "pool")
    loaded = load_router(tmp_path / "pool")
    assert isinstance(loaded, RouteT2IRouter) and loaded.tiers == TIERS
    np.testing.assert_array_equal(
        loaded.predict_quality(test.prompts), router.predict_quality(test.prompts)
    )


def test_single_frontier_is_the_concave_hull() -> None:
    costs = np.array([0.5, 1.0, 3.0, 6.0, 15.0, 20.0])
    quality = np.array([3.08, 2.85, 3.11, 3.23, 3.49, 3.72])
    hull_c = single_frontier(costs, quality)[0]
    # GenAI-Bench's means: every model between Turbo and DALL-E 3 lies below their chord.
    assert hull_c.tolist() == [0.5, 20.0]
    assert frontier_quality(costs, quality, 20.0) == pytest.approx(3.72)
    assert frontier_quality(costs, quality, 13.0) == pytest.approx(3.08 + 12.5 / 19.5 * 0.64)
    kinked = np.array([1.0, 3.0, 20.0]), np.array([1.0, 3.0, 3.5])
    assert single_frontier(*kinked)[0].tolist() == [1.0, 3.0, 20.0]
    assert cost_to_reach(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]), 3.0) == 2.5
    assert np.isnan(cost_to_reach(np.array([1.0, 2.0]), np.array([1.0, 2.0]), 5.0))


def test_pool_harness_puts_the_oracle_above_the_frontier(encoder: FrozenTextEncoder) -> None:
    experiment = PoolExperiment("words", word_pool(), tuple(COSTS))
    factories = pool_router_factories(["random", "oracle"], SharedEncoding(encoder))
    scores = cross_validate_pool([experiment], factories, folds=3, seeds=[0], extra_budgets=[5])
    references = pool_references([experiment], scores)
    summaries = {s.router: s for s in summarise_pool(scores, references, [5])}
    ref = references["words"]
    assert ref.tiers[ref.best] == "dear"
    oracle = summaries["oracle"]
    frontier = np.array([ref.frontier(float(b)) for b in oracle.budgets])
    assert np.all(oracle.quality >= frontier - 1e-9)
    assert np.all(oracle.cost <= oracle.budgets + 1e-9)
    assert oracle.match_cost < 5.0 and 5 in oracle.at_budget
    assert np.isnan(summaries["random"].match_cost) or summaries["random"].match_cost > 5.0


def test_eval_pool_cli_writes_reports(tmp_path: Path, encoder: FrozenTextEncoder) -> None:
    table = word_pool()
    records = {
        f"{i:05d}": {
            "id": i,
            "prompt": p,
            "models": {
                t: [float(q)] * 3 for t, q in zip(TIERS, table.quality[i, :, 0], strict=True)
            },
        }
        for i, p in enumerate(table.prompts[:60])
    }
    data = tmp_path / "ratings.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "pool"
    arguments = [
        "pool",
        "--data", str(data),
        "--costs", "cheap=1,mid=3,dear=20",
        "--routers", "random,prompt_length,oracle",
        "--seeds", "1",
        "--folds", "3",
        "--at", "5",
        "--out", str(out),
    ]  # fmt: skip
    refused = CliRunner().invoke(eval_app, [*arguments, "--pools", ""])
    assert refused.exit_code != 0 and "no pool" in refused.output
    result = CliRunner().invoke(eval_app, [*arguments, "--pools", "words=dear+cheap+mid"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {
        "summary.md", "summary.csv", "singles.csv", "curves.csv", "folds.csv", "run.json",
        "curves_words.png",
    }  # fmt: skip
    markdown = (out / "summary.md").read_text()
    assert "| cheap | 1 | " in markdown and "| oracle |" in markdown
    run = json.loads((out / "run.json").read_text())
    assert run["costs"] == {"words": {"cheap": 1.0, "mid": 3.0, "dear": 20.0}}
