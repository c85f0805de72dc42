"""The policy's rule has one home (routing/policy.py): the batch form calibration compares in
(``choose_tiers``), the ranking the workers use (``rank_tiers``) and the exploration margin
(``margins``) make the same choice."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from routing.policy import choose_tiers, margins, pair_scores, rank_tiers

COSTS = {"edge": 1.0, "mid": 3.0, "cloud": 10.0}
# Scores on a grid of 1/8 and lambdas of 1/64: exact in binary, so ties are real ties.
SCORES = st.lists(st.integers(0, 8).map(lambda v: v / 8), min_size=3, max_size=3)


@given(SCORES, st.integers(0, 64).map(lambda v: v / 64))
def test_the_ranking_leads_with_the_tier_choose_tiers_picks(
    scores: list[float], lam: float
) -> None:
    quality = dict(zip(COSTS, scores, strict=True))
    chosen = choose_tiers([scores], list(COSTS.values()), lam)[0]
    assert rank_tiers(quality, COSTS, lam)[0] == list(COSTS)[chosen]
    values = sorted(np.array(scores) - lam * np.array(list(COSTS.values())))
    assert margins([scores], list(COSTS.values()), lam)[0] == values[-1] - values[-2]


def test_an_infinite_lambda_ranks_cheapest_first_and_has_no_margin() -> None:
    assert rank_tiers({"edge": 0.0, "mid": 1.0, "cloud": 2.0}, COSTS, math.inf) == list(COSTS)
    assert math.isinf(margins([[0.0, 1.0, 2.0]], list(COSTS.values()), math.inf)[0])


def test_pair_scores_put_the_cheapest_at_a_half_and_the_dearest_at_one_minus_prs() -> None:
    scores = pair_scores(np.array([0.2, 0.5]), 3)
    assert scores.tolist() == [[0.5, 0.65, 0.8], [0.5, 0.5, 0.5]]
