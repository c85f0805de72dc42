"""Which requests are offered an exploration token (workers/services/exploration.py)."""

from __future__ import annotations

import math
import uuid

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from workers.pool import Pool, TierSpec
from workers.services import exploration
from workers.services.router import answer_budget
from workers.settings import Settings

POOL = Pool(
    [
        TierSpec(name="edge", model="m", cost=1.0),
        TierSpec(name="mid", model="m", cost=3.0),
        TierSpec(name="cloud", model="m", cost=10.0),
    ]
)
IDS = [str(uuid.UUID(int=i * 7919 + 1, version=4)) for i in range(4000)]


@given(st.uuids())
def test_a_draw_is_fixed_by_the_id(request_id: uuid.UUID) -> None:
    value = exploration.draw(str(request_id))
    assert 0.0 <= value < 1.0
    assert exploration.draw(str(request_id)) == value


def test_the_uniform_slice_has_its_share() -> None:
    inside = [exploration.in_uniform_slice(i, "margin", 0.2, 0.5) for i in IDS]
    assert abs(np.mean(inside) - 0.1) < 0.02
    assert all(exploration.in_uniform_slice(i, "uniform", 0.2, 0.5) for i in IDS[:10])


def test_margins_are_the_gap_to_the_runner_up_at_the_tradeoff() -> None:
    predicted = [{"edge": 0.5, "mid": 0.6, "cloud": 0.9}]
    # At lambda 0 the scores are the qualities: cloud 0.9 leads mid 0.6 by 0.3.
    assert exploration.margins(predicted, POOL, 0.0)[0] == np.float64(0.9 - 0.6)
    # At lambda 0.05: edge 0.45, mid 0.45, cloud 0.4: a tie between edge and mid.
    assert abs(exploration.margins(predicted, POOL, 0.05)[0]) < 1e-12
    assert math.isinf(exploration.margins(predicted, POOL, math.inf)[0])


def test_uniform_offers_every_request() -> None:
    offered = exploration.candidates(
        IDS[:50], np.zeros(50), strategy="uniform", exploration_rate=0.1, share=0.5,
        threshold=-math.inf,
    )  # fmt: skip
    assert all(offered)


def test_margin_offers_the_uniform_slice_and_the_prompts_nearest_the_boundary() -> None:
    rng = np.random.default_rng(0)
    recent = rng.uniform(0, 1, 1000)
    threshold = exploration.margin_threshold(recent, 0.2, 0.5)
    # Twice the informed token rate (0.2 * 0.5) of the recent margins fall below it.
    assert abs(np.mean(recent <= threshold) - 0.2) < 0.01
    margins = rng.uniform(0, 1, len(IDS))
    offered = np.array(
        exploration.candidates(
            IDS, margins, strategy="margin", exploration_rate=0.2, share=0.5, threshold=threshold
        )
    )
    uniform = np.array([exploration.in_uniform_slice(i, "margin", 0.2, 0.5) for i in IDS])
    assert np.all(offered[margins <= threshold])
    assert np.all(offered[uniform])
    assert not np.any(offered[(margins > threshold) & ~uniform])
    # Before any recent margin is known, every request is offered.
    assert exploration.margin_threshold(np.array([]), 0.2, 0.5) == math.inf


def test_the_answers_budget_leaves_room_for_exploration() -> None:
    settings = Settings(cloud_ratio=0.3, exploration_rate=0.2, edge_cost=1.0, cloud_cost=11.0)
    # B = 0.3 * 10 = 3; exploration takes 0.2 * 10 = 2 per request on average.
    assert answer_budget(settings) == 3.0 - 2.0
    assert answer_budget(settings.model_copy(update={"exploration_rate": 0.0})) == 3.0


def test_ties_are_broken_by_the_request_and_by_less_than_any_real_gap() -> None:
    from routing.policy import TIE_BREAK
    from workers.services.router import Prediction, break_ties

    tied = Prediction({"edge": 0.5, "mid": 0.6, "cloud": 0.6}, None, "v")
    broken = [break_ties(tied, rid, POOL) for rid in IDS[:200]]
    assert all(b.quality["edge"] == 0.5 for b in broken)
    shifts = np.array([b.quality["cloud"] - 0.6 for b in broken])
    assert np.all(np.abs(shifts) < TIE_BREAK) and len(set(shifts.round(15))) > 150
    assert break_ties(tied, IDS[0], POOL) == broken[0]
