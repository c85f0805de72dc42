"""The whole learning path on real model outputs, no servers needed: tiny pipelines make both
tiers' images, CLIP scores them on the ten metrics, the table goes through the CSV format,
PRS labels come from it, RouteT2I trains on it, routes it, and the harness compares it with
the baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from routing.calibrate import calibrate_alpha, route_to_cloud
from routing.data import load_metric_table
from routing.encoder import FrozenTextEncoder
from routing.encodings import SharedEncoding
from routing.evaluate import Experiment, cross_validate, router_factories
from routing.metrics import METRIC_NAMES
from routing.prs import PRSParams
from routing.quality import ContrastiveQualityScorer
from routing.routet2i import RouteT2IRouter
from routing.types import PairTable
from tests.unit.tiny_text_encoder import build_tiny_encoder
from workers.entrypoints.demo import demo_prompts
from workers.offline import pairs
from workers.offline.pairs import make_pair_table, write_metric_table
from workers.services.pipelines import load_clip, load_pipeline

N_PROMPTS = 12
GENERATION = {"width": 32, "height": 32, "steps": 2}


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    texts = demo_prompts(None)[:N_PROMPTS]
    assert len(texts) == N_PROMPTS
    return texts


@pytest.fixture(scope="module")
def tiers(tiny_models: dict[str, Path]) -> dict[str, DiffusionPipeline]:
    return {tier: load_pipeline(str(tiny_models[tier])) for tier in ("edge", "cloud")}


@pytest.fixture(scope="module")
def scorer(tiny_models: dict[str, Path]) -> ContrastiveQualityScorer:
    return ContrastiveQualityScorer(*load_clip(str(tiny_models["clip"])))


@pytest.fixture(scope="module")
def table(
    prompts: list[str], tiers: dict[str, DiffusionPipeline], scorer: ContrastiveQualityScorer
) -> PairTable:
    return make_pair_table(prompts, tiers["edge"], tiers["cloud"], scorer, seed=0, **GENERATION)


@pytest.fixture(scope="module")
def reloaded(table: PairTable, tmp_path_factory: pytest.TempPathFactory) -> PairTable:
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    write_metric_table(table, path)
    return load_metric_table(path)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> FrozenTextEncoder:
    return FrozenTextEncoder(build_tiny_encoder(tmp_path_factory.mktemp("encoder")))


def test_table_holds_every_metric_for_both_tiers(table: PairTable, prompts: list[str]) -> None:
    assert table.prompts == tuple(prompts)
    assert table.metrics == METRIC_NAMES
    for scores in (table.edge, table.cloud):
        assert scores.shape == (N_PROMPTS, len(METRIC_NAMES))
        assert np.all((scores > 0) & (scores < 1))
        # Every metric tells the prompts' images apart.
        assert np.all(scores.std(axis=0) > 0)
    assert not np.allclose(table.edge, table.cloud)


def test_pairs_do_not_depend_on_batching(
    table: PairTable,
    prompts: list[str],
    tiers: dict[str, DiffusionPipeline],
    scorer: ContrastiveQualityScorer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prompt i gets seed + i wherever it sits: a slice made in chunks of two repeats the rows."""
    monkeypatch.setattr(pairs, "SCORE_BATCH", 2)
    part = make_pair_table(
        prompts[3:8], tiers["edge"], tiers["cloud"], scorer, seed=3, **GENERATION
    )
    np.testing.assert_allclose(part.edge, table.edge[3:8], rtol=0, atol=1e-6)
    np.testing.assert_allclose(part.cloud, table.cloud[3:8], rtol=0, atol=1e-6)


def test_no_prompts_is_an_error(
    tiers: dict[str, DiffusionPipeline], scorer: ContrastiveQualityScorer
) -> None:
    with pytest.raises(ValueError, match="no prompts"):
        make_pair_table([], tiers["edge"], tiers["cloud"], scorer, seed=0, **GENERATION)


def test_csv_round_trip_is_exact(table: PairTable, reloaded: PairTable) -> None:
    assert reloaded.prompts == table.prompts
    assert reloaded.metrics == table.metrics
    assert np.array_equal(reloaded.edge, table.edge)
    assert np.array_equal(reloaded.cloud, table.cloud)


def test_prs_labels_use_every_metric(reloaded: PairTable) -> None:
    params = PRSParams.fit(reloaded)
    distance, prs = params.labels(reloaded)
    assert distance.shape == (N_PROMPTS, len(METRIC_NAMES))
    assert np.all((distance > 0) & (distance < 1))
    assert np.all(distance.std(axis=0) > 0)
    # Equal weights by default: PRS is the mean of the ten distances.
    np.testing.assert_allclose(prs, distance.mean(axis=1))
    assert 0 < prs.min() < prs.max() < 1


def test_routet2i_trains_and_routes_on_the_pairs(
    reloaded: PairTable, encoder: FrozenTextEncoder
) -> None:
    router = RouteT2IRouter(encoder=encoder, epochs=15, top_k=4)
    router.fit(reloaded)
    assert router.metrics == METRIC_NAMES
    assert router.prs_params == PRSParams.fit(reloaded, gamma=router.config.gamma)
    predicted = router.predict_prs(reloaded.prompts)
    metrics = router.predict_metrics(reloaded.prompts)
    assert predicted.shape == (N_PROMPTS,)
    assert np.all(np.isfinite(predicted)) and np.all((predicted >= 0) & (predicted <= 1))
    assert metrics.shape == (N_PROMPTS, len(METRIC_NAMES))
    assert np.all(np.isfinite(metrics))
    alpha = calibrate_alpha(predicted, rho=0.25)
    assert route_to_cloud(predicted, alpha).mean() <= 0.25


def test_harness_runs_on_the_pairs(reloaded: PairTable, encoder: FrozenTextEncoder) -> None:
    names = ("random", "prompt_length", "routet2i", "oracle")
    factories = router_factories(names, SharedEncoding(encoder))
    scores = cross_validate(
        [Experiment.same_pair("tiny", reloaded)], factories, folds=3, seeds=(0,)
    )
    assert len(scores) == 3 * len(names)
    by_fold: dict[int, dict[str, np.ndarray]] = {}
    for score in scores:
        assert np.all(np.isfinite(score.quality))
        by_fold.setdefault(score.fold, {})[score.router] = score.quality
    for curves in by_fold.values():
        # No router beats the oracle, which sends the largest cloud gains first.
        for name in names:
            assert np.all(curves[name] <= curves["oracle"] + 1e-12), name
