"""The calibrated threshold must never promise more cloud calls than the budget share."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from routing.calibrate import calibrate_alpha, route_to_cloud

# Few distinct values on purpose: ties are where thresholds go wrong.
predictions = arrays(
    np.float64,
    st.integers(0, 60),
    elements=st.one_of(st.sampled_from([0.1, 0.25, 0.5, 0.5, 0.75]), st.floats(0.0, 1.0)),
)
shares = st.floats(0.0, 1.0)
caps = st.floats(0.0, 1.0)


@given(predictions, shares, caps)
def test_cloud_share_never_exceeds_rho(prs: np.ndarray, rho: float, max_alpha: float) -> None:
    alpha = calibrate_alpha(prs, rho, max_alpha)
    assert 0.0 <= alpha <= max_alpha
    if prs.size:
        assert route_to_cloud(prs, alpha).mean() <= rho


@given(predictions, shares)
def test_threshold_is_as_high_as_the_budget_allows(prs: np.ndarray, rho: float) -> None:
    alpha = calibrate_alpha(prs, rho)
    if 0.0 < rho < 1.0 and prs.size and alpha < 0.5:
        # Any higher threshold lets through the next block of tied predictions and breaks rho.
        next_value = prs[prs >= alpha].min()
        assert np.mean(prs <= next_value) > rho


def test_rho_zero_routes_nothing_and_rho_one_caps_at_max_alpha() -> None:
    prs = np.array([0.0, 0.1, 0.2, 0.9])
    assert calibrate_alpha(prs, 0.0) == 0.0
    assert not route_to_cloud(prs, calibrate_alpha(prs, 0.0)).any()
    assert calibrate_alpha(prs, 1.0, max_alpha=0.4) == 0.4


def test_ties_go_together_or_not_at_all() -> None:
    prs = np.array([0.2, 0.3, 0.3, 0.3, 0.8])
    assert calibrate_alpha(prs, 0.5) == 0.3  # only 0.2 fits; the three 0.3s would make 80%
    assert route_to_cloud(prs, 0.3).tolist() == [True, False, False, False, False]


def test_empty_sample_fails_cheap() -> None:
    assert calibrate_alpha(np.array([]), 0.3) == 0.0
    assert calibrate_alpha(np.array([]), 1.0) == 0.5


@pytest.mark.parametrize(("rho", "max_alpha"), [(-0.1, 0.5), (1.5, 0.5), (0.3, 2.0)])
def test_bad_arguments_are_refused(rho: float, max_alpha: float) -> None:
    with pytest.raises(ValueError):
        calibrate_alpha(np.array([0.4]), rho, max_alpha)


def test_a_plain_list_is_accepted() -> None:
    assert calibrate_alpha([0.4, 0.1, 0.3, 0.2], 0.5) == 0.3
    assert calibrate_alpha([], 0.5) == 0.0


def test_non_finite_predictions_are_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        calibrate_alpha(np.array([0.4, np.nan]), 0.5)
