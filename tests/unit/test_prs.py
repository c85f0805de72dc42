"""Properties of the labels: PRS must treat the tiers symmetrically and reward edge quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from routing.prs import (
    MIN_MEAN_GAP,
    PRSParams,
    check_weights,
    normalised_distance,
    prs,
    tier_means,
)
from routing.types import PairTable

quality = st.floats(0.0, 5.0, allow_nan=False, allow_infinity=False)
gammas = st.floats(0.05, 10.0)


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    """Edge and cloud scores (n, m), tier means (m,) and weights (m,), m in {1..10}."""
    n = draw(st.integers(1, 6))
    m = draw(st.sampled_from([1, 2, 10]))
    edge = draw(arrays(np.float64, (n, m), elements=quality))
    cloud = draw(arrays(np.float64, (n, m), elements=quality))
    mu_e = draw(arrays(np.float64, (m,), elements=quality))
    mu_c = draw(arrays(np.float64, (m,), elements=quality))
    raw = draw(arrays(np.float64, (m,), elements=st.floats(0.0, 1.0)))
    weights = raw / raw.sum() if raw.sum() > 0 else np.full(m, 1.0 / m)
    return edge, cloud, mu_e, mu_c, weights


def _prs(
    edge: np.ndarray,
    cloud: np.ndarray,
    mu_e: np.ndarray,
    mu_c: np.ndarray,
    w: np.ndarray,
    gamma: float,
) -> np.ndarray:
    return prs(normalised_distance(edge, cloud, mu_e, mu_c, gamma), w)


@given(cases(), gammas)
def test_swapping_tiers_mirrors_prs(case: tuple[np.ndarray, ...], gamma: float) -> None:
    edge, cloud, mu_e, mu_c, w = case
    forward = _prs(edge, cloud, mu_e, mu_c, w, gamma)
    backward = _prs(cloud, edge, mu_c, mu_e, w, gamma)
    np.testing.assert_allclose(forward, 1.0 - backward, atol=1e-12)


@given(cases(), gammas)
def test_prs_stays_in_unit_interval(case: tuple[np.ndarray, ...], gamma: float) -> None:
    edge, cloud, mu_e, mu_c, w = case
    value = _prs(edge, cloud, mu_e, mu_c, w, gamma)
    assert np.all((value >= 0.0) & (value <= 1.0))
    # Strictly inside whenever no argument of the sigmoid is extreme.
    gap = np.maximum(np.abs(mu_e - mu_c), MIN_MEAN_GAP)
    if np.all(np.abs(edge - cloud) / (gamma * gap) < 30):
        assert np.all((value > 0.0) & (value < 1.0))


@given(cases(), gammas, st.integers(0, 9), st.floats(0.0, 3.0))
def test_prs_rises_with_edge_and_falls_with_cloud(
    case: tuple[np.ndarray, ...], gamma: float, column: int, delta: float
) -> None:
    edge, cloud, mu_e, mu_c, w = case
    j = column % edge.shape[1]
    base = _prs(edge, cloud, mu_e, mu_c, w, gamma)
    better_edge, better_cloud = edge.copy(), cloud.copy()
    better_edge[:, j] += delta
    better_cloud[:, j] += delta
    assert np.all(_prs(better_edge, cloud, mu_e, mu_c, w, gamma) >= base)
    assert np.all(_prs(edge, better_cloud, mu_e, mu_c, w, gamma) <= base)


@given(cases(), gammas)
def test_equal_quality_is_a_tie(case: tuple[np.ndarray, ...], gamma: float) -> None:
    edge, _, mu_e, mu_c, w = case
    assert np.all(normalised_distance(edge, edge, mu_e, mu_c, gamma) == 0.5)
    np.testing.assert_allclose(_prs(edge, edge, mu_e, mu_c, w, gamma), 0.5)


def test_equal_tier_means_do_not_divide_by_zero() -> None:
    d = normalised_distance(
        np.array([[0.6, 0.5]]),
        np.array([[0.4, 0.5]]),
        np.array([0.5, 0.5]),
        np.array([0.5, 0.5]),
        gamma=1.0,
    )
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d, [[1.0, 0.5]])


@pytest.mark.parametrize("weights", [(0.5, 0.6), (-0.5, 1.5), (1.0,), (float("nan"), 1.0)], ids=str)
def test_bad_weights_are_refused(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        check_weights(weights, 2)


def test_tier_means_are_column_means() -> None:
    mu_e, mu_c = tier_means(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.0, 0.0], [2.0, 2.0]]))
    np.testing.assert_allclose(mu_e, [2.0, 3.0])
    np.testing.assert_allclose(mu_c, [1.0, 1.0])


@pytest.mark.parametrize("m", [1, 10])
def test_params_fit_label_and_round_trip_through_json(m: int) -> None:
    rng = np.random.default_rng(m)
    table = PairTable(
        prompts=tuple(f"prompt {i}" for i in range(8)),
        edge=rng.uniform(1, 5, (8, m)),
        cloud=rng.uniform(1, 5, (8, m)) + 0.5,
        metrics=tuple(f"metric{i}" for i in range(m)),
    )
    params = PRSParams.fit(table, gamma=0.7)
    distance, score = params.labels(table)
    assert distance.shape == (8, m) and score.shape == (8,)
    np.testing.assert_allclose(score, distance.mean(axis=1))
    np.testing.assert_allclose(params.mu_cloud, table.cloud.mean(axis=0))
    restored = PRSParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert restored == params


def test_params_refuse_a_table_with_other_metrics() -> None:
    params = PRSParams(mu_edge=(1.0,), mu_cloud=(2.0,), gamma=1.0, weights=(1.0,))
    table = PairTable(("p",), np.ones((1, 2)), np.ones((1, 2)), ("a", "b"))
    with pytest.raises(ValueError, match="metrics"):
        params.labels(table)


@settings(max_examples=25)
@given(st.integers(1, 10))
def test_default_weights_are_uniform(m: int) -> None:
    table = PairTable(("p", "q"), np.zeros((2, m)), np.ones((2, m)), tuple(map(str, range(m))))
    np.testing.assert_allclose(PRSParams.fit(table).weights, np.full(m, 1.0 / m))
