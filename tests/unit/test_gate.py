"""The promotion gate (``workers.services.retraining.judge``) on synthetic labels where the truth is
known: the cloud gains on prompts that mention a crowd, and prompt length says nothing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from routing.baselines import PromptLengthRouter, RandomRouter
from routing.types import PairTable
from workers.services.retraining import judge


class KeywordRouter:
    """Knows where the cloud is better: the candidate that should pass."""

    name = "keyword"

    def fit(self, train: PairTable) -> None:
        pass

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array([0.1 if "crowd" in p else 0.9 for p in prompts])


def _table(n: int, seed: int = 0) -> PairTable:
    rng = np.random.default_rng(seed)
    crowd = rng.random(n) < 0.5
    words = rng.integers(3, 15, n)
    prompts = tuple(
        " ".join(["a crowd" if c else "a cat"] + ["word"] * int(w))
        for c, w in zip(crowd, words, strict=True)
    )
    edge = rng.uniform(2.0, 3.0, n)
    cloud = edge + np.where(crowd, 1.0, -0.2) + rng.normal(0, 0.05, n)
    return PairTable(prompts, edge[:, None], cloud[:, None], ("rating",))


EVERY = np.ones(120, dtype=bool)


def test_a_better_candidate_is_promoted() -> None:
    verdict = judge(
        _table(120), EVERY, KeywordRouter, PromptLengthRouter, ("baseline:x", None),
        min_z=2.0, seed=0,
    )  # fmt: skip
    assert verdict.promote, verdict.reason
    assert verdict.candidate_apgr > 0.9 > verdict.cold_start_apgr
    assert verdict.z > 2.0


def test_a_worse_candidate_is_refused() -> None:
    verdict = judge(
        _table(120), EVERY, lambda: RandomRouter(seed=1), KeywordRouter, ("baseline:x", None),
        min_z=1.0, seed=0,
    )  # fmt: skip
    assert not verdict.promote
    assert "standard errors" in verdict.reason


def test_a_candidate_must_beat_the_serving_version_too() -> None:
    verdict = judge(
        _table(120), EVERY, KeywordRouter, PromptLengthRouter, ("v1", KeywordRouter()),
        min_z=1.0, seed=0,
    )  # fmt: skip
    assert not verdict.promote
    assert "v1" in verdict.reason


def test_only_the_uniform_slice_is_scored() -> None:
    table = _table(120)
    few = np.zeros(120, dtype=bool)
    few[:5] = True
    verdict = judge(
        table, few, KeywordRouter, PromptLengthRouter, ("baseline:x", None), min_z=0.0, seed=0
    )
    assert not verdict.promote and verdict.n_evaluated == 5
    assert "fewer than" in verdict.reason


@pytest.mark.parametrize("gain", [0.0, -0.3])
def test_no_gain_to_recover_refuses(gain: float) -> None:
    table = _table(60)
    flat = PairTable(table.prompts, table.edge, table.edge + gain, table.metrics)
    verdict = judge(
        flat, np.ones(60, dtype=bool), KeywordRouter, PromptLengthRouter, ("b", None),
        min_z=0.0, seed=0,
    )  # fmt: skip
    assert not verdict.promote
