"""The learning curve (``routing.learning_curve``) on synthetic tables where one kind of word
decides whether the dear tier is worth its cost, a signal that a router can learn from enough
labels and that prompt length does not carry; and on the same prompts with random labels, where
nothing can be learned. No text encoder: the learned router is the TF-IDF ridge regression."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from routing.evaluate import Experiment, FoldContext, RouterFactory, router_factories
from routing.learning_curve import (
    CurvePoint,
    PairedGap,
    check_plan,
    cold_start_verdicts,
    first_beating_size,
    headlines,
    learning_split,
    pair_learning_curve,
    pool_learning_curve,
    write_learning_curve,
)
from routing.pool_baselines import TfidfRidgeRouter
from routing.pool_evaluate import PoolExperiment, pool_router_factories
from routing.types import PairTable, PoolTable
from tests.unit.tiny_text_encoder import build_tiny_encoder
from workers.entrypoints.cli.eval import eval_app

HARD = ("glass", "mirror", "crowd", "lettering", "hands", "reflection")
PLAIN = ("photo", "image", "picture", "drawing", "view", "painting")
FILLER = ("red", "cat", "table", "near", "big", "house", "tree", "dog", "blue", "small", "river")
SIZES = (4, 40, 160)
SEEDS = range(6)
PROMPTS = 260


def _prompts(rng: np.random.Generator) -> tuple[tuple[str, ...], np.ndarray]:
    """Prompts of 3 to 11 filler words and one more: a hard word in 30% of them, a plain one
    in the others, so that the hard word does not make a prompt longer."""
    prompts, hard = [], []
    for i in range(PROMPTS):
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(3, 12)))]
        is_hard = bool(rng.random() < 0.3)
        extra = str(rng.choice(HARD if is_hard else PLAIN))
        words.insert(int(rng.integers(len(words) + 1)), extra)
        prompts.append(" ".join(words) + f" scene{i}")
        hard.append(is_hard)
    return tuple(prompts), np.array(hard)


def _gain(
    rng: np.random.Generator, prompts: Sequence[str], hard: np.ndarray, signal: bool
) -> np.ndarray:
    """The dear tier's lead: a little more per word, which prompt length knows from the start,
    and 1.5 more on hard prompts, which only a router that learned the hard words knows; or
    noise of the same mean and spread."""
    if signal:
        words = np.array([len(p.split()) for p in prompts], dtype=np.float64)
        return 1.5 * hard + 0.15 * (words - words.mean()) + rng.normal(0.0, 0.4, len(hard))
    return rng.normal(0.45, 0.9, len(hard))


def pair_table(signal: bool) -> PairTable:
    rng = np.random.default_rng(0)
    prompts, hard = _prompts(rng)
    edge = rng.normal(3.0, 0.3, (PROMPTS, 1))
    cloud = edge + _gain(rng, prompts, hard, signal)[:, None]
    return PairTable(prompts, edge, cloud, ("rating",))


def pool_table(signal: bool) -> PoolTable:
    rng = np.random.default_rng(1)
    prompts, hard = _prompts(rng)
    cheap = rng.normal(3.0, 0.3, PROMPTS)
    middle = cheap + 0.2 + rng.normal(0.0, 0.2, PROMPTS)
    dear = cheap + _gain(rng, prompts, hard, signal)
    quality = np.stack([cheap, middle, dear], axis=1)[:, :, None]
    return PoolTable(prompts, quality, ("cheap", "middle", "dear"), ("rating",))


class PoolAsPair:
    """A pool router read as a pair router: the lower the score, the more the cloud's predicted
    lead over the edge (only the order matters to the harness)."""

    name = "tfidf_ridge"

    def __init__(self) -> None:
        self.pool = TfidfRidgeRouter()

    def fit(self, train: PairTable) -> None:
        self.pool.fit(train.pool())

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        quality = self.pool.predict_quality(prompts)
        score: np.ndarray = quality[:, 0] - quality[:, 1]
        return score


def pair_routers() -> dict[str, RouterFactory]:
    factories = router_factories(["random", "prompt_length"])
    factories["tfidf_ridge"] = lambda context: PoolAsPair()
    return factories


def pair_points(signal: bool) -> list[CurvePoint]:
    experiment = Experiment.same_pair("pair", pair_table(signal))
    return pair_learning_curve([experiment], pair_routers(), SIZES, SEEDS)


def pool_points(signal: bool) -> list[CurvePoint]:
    experiment = PoolExperiment("pool", pool_table(signal), (1.0, 3.0, 20.0))
    factories = pool_router_factories(["random", "prompt_length", "tfidf_ridge"])
    return pool_learning_curve([experiment], factories, SIZES, SEEDS, grid_points=21)


@pytest.fixture(scope="module")
def signal_points() -> list[CurvePoint]:
    return pair_points(True) + pool_points(True)


def _headline(points: Sequence[CurvePoint], kind: str, router: str) -> int | None:
    found = [h for h in headlines(points, "prompt_length") if (h.kind, h.router) == (kind, router)]
    assert len(found) == 1
    return found[0].size


def test_a_split_holds_n_training_prompts_apart_from_the_rest_and_nests_as_n_grows() -> None:
    small_train, _ = learning_split(100, 10, seed=3)
    train, test = learning_split(100, 40, seed=3)
    assert len(train) == 40 and len(test) == 60
    assert not set(train) & set(test) and set(train) | set(test) == set(range(100))
    assert set(small_train) <= set(train)
    assert not np.array_equal(train, learning_split(100, 40, seed=4)[0])
    with pytest.raises(ValueError, match="1 <= n < 100"):
        learning_split(100, 100, seed=0)


class _Recorder:
    """Remembers what it was trained on and asked about."""

    name = "recorder"
    seen: ClassVar[list[tuple[int, set[str], set[str]]]] = []

    def __init__(self, context: FoldContext) -> None:
        self.seed = context.seed
        self.train: set[str] = set()

    def fit(self, train: PairTable) -> None:
        self.train = set(train.prompts)

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        _Recorder.seen.append((self.seed, self.train, set(prompts)))
        return np.zeros(len(prompts))


def test_training_and_test_prompts_never_overlap_and_cover_the_table() -> None:
    table = pair_table(True)
    _Recorder.seen = []
    pair_learning_curve([Experiment.same_pair("p", table)], {"recorder": _Recorder}, SIZES, SEEDS)
    assert len(_Recorder.seen) == len(SIZES) * len(SEEDS)
    for seed, train, test in _Recorder.seen:
        assert len(train) == seed % 1000  # the router seed is seed * 1000 + n
        assert not train & test
        assert train | test == set(table.prompts)


def test_every_router_size_and_seed_has_one_point(signal_points: list[CurvePoint]) -> None:
    for kind, routers in (
        ("pair", pair_routers()),
        ("pool", ("random", "prompt_length", "tfidf_ridge")),
    ):
        keys = [(p.router, p.size, p.seed) for p in signal_points if p.kind == kind]
        expected = {(r, n, s) for r in routers for n in SIZES for s in SEEDS}
        assert len(keys) == len(expected) and set(keys) >= expected
    assert all(p.test_prompts == PROMPTS - p.size for p in signal_points)
    assert all(np.isfinite(p.value) for p in signal_points)


def test_the_learned_router_beats_the_cold_start_once_the_signal_is_learnable(
    signal_points: list[CurvePoint],
) -> None:
    """Four prompts hold at most a couple of the six hard words and forty too few of each;
    from 160 the learned words outweigh what length alone knows. On the pair, where prompt
    length needs no label, it is ahead at four."""
    for kind in ("pair", "pool"):
        assert _headline(signal_points, kind, "tfidf_ridge") == SIZES[-1]
        assert _headline(signal_points, kind, "random") is None
        (learned,) = [
            h
            for h in headlines(signal_points, "prompt_length")
            if (h.kind, h.router) == (kind, "tfidf_ridge")
        ]
        assert [g.size for g in learned.gaps] == list(SIZES)
        assert [g.beats for g in learned.gaps] == [False, False, True]
        assert learned.gaps[0].loses or kind == "pool"


def test_without_a_signal_the_headline_is_never() -> None:
    points = pair_points(False) + pool_points(False)
    assert _headline(points, "pair", "tfidf_ridge") is None
    assert _headline(points, "pool", "tfidf_ridge") is None


def test_the_stronger_cold_start_policy_is_named(signal_points: list[CurvePoint]) -> None:
    """The gain grows with the number of words, so prompt length beats random at every n."""
    (verdict,) = cold_start_verdicts(signal_points, "prompt_length", "random")
    assert verdict.winner == "prompt_length"
    assert verdict.sentence() == "prompt_length beats random beyond noise at every n."
    (reverse,) = cold_start_verdicts(signal_points, "random", "prompt_length")
    assert reverse.winner == "prompt_length"
    (none,) = cold_start_verdicts(signal_points, "tfidf_ridge", "prompt_length")
    assert none.winner is None
    assert none.sentence().startswith("neither beats the other")


def _gap(size: int, mean: float, se: float) -> PairedGap:
    return PairedGap("pair", "p", "learned", "prompt_length", size, 5, mean, se)


def test_the_headline_is_the_smallest_n_from_which_on_every_larger_n_wins() -> None:
    """A win at 25 followed by a tie at 50 is luck, not a threshold to retrain at."""
    gaps = [_gap(25, 0.05, 0.01), _gap(50, 0.01, 0.01), _gap(100, 0.03, 0.01), _gap(200, 0.04, 0)]
    assert [g.beats for g in gaps] == [True, False, True, True]
    assert first_beating_size(gaps) == 100
    assert first_beating_size(gaps[:2]) is None
    assert first_beating_size([]) is None
    assert not _gap(25, 0.019, 0.01).beats and not _gap(25, -0.5, 0.01).beats


def test_a_plan_that_cannot_be_measured_fails_before_training() -> None:
    with pytest.raises(ValueError, match="cold-start"):
        check_plan(SIZES, PROMPTS, ["random"], "prompt_length")
    with pytest.raises(ValueError, match="n must lie"):
        check_plan((4, PROMPTS), PROMPTS, ["prompt_length"], "prompt_length")
    check_plan(SIZES, PROMPTS, ["prompt_length"], "prompt_length")


def test_the_reports_are_written(signal_points: list[CurvePoint], tmp_path: Path) -> None:
    run: dict[str, object] = {"command": "t2iroute eval learning-curve", "wall_seconds": 1.0}
    write_learning_curve(tmp_path, signal_points, run, "prompt_length")
    with (tmp_path / "learning_curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(signal_points)
    assert {r["metric"] for r in rows} == {"apgr", "quality_at_cost"}
    markdown = (tmp_path / "summary.md").read_text()
    assert "beats prompt_length from n" in markdown and "2 standard errors" in markdown
    rows_of = {
        r: [line for line in markdown.splitlines() if line.startswith(f"| {r} |")]
        for r in ("tfidf_ridge", "random")
    }
    assert any(line.endswith(f"| {SIZES[-1]} |") for line in rows_of["tfidf_ridge"])
    assert any(line.endswith("| never |") for line in rows_of["random"])
    with Image.open(tmp_path / "learning_curve.png") as image:
        assert image.format == "PNG" and image.width > image.height


def _ratings_file(path: Path) -> Path:
    """The synthetic pool as GenAI-Bench's ratings file: three ratings per image on 1-5."""
    table = pool_table(True)
    tiers = dict(zip(("SDXL_2_1", "SDXL_Base", "DALLE_3"), range(3), strict=True))
    records = {}
    for i, prompt in enumerate(table.prompts):
        scores = {m: float(np.clip(table.quality[i, t, 0], 1, 5)) for m, t in tiers.items()}
        scores |= {m: 3.0 for m in ("SDXL_Turbo", "DeepFloyd_I_XL_v1", "Midjourney_6")}
        records[f"{i:05d}"] = {"prompt": prompt, "models": {m: [s] * 3 for m, s in scores.items()}}
    path.write_text(json.dumps(records))
    return path


def test_the_command_measures_a_ratings_file_and_refuses_a_plan_it_cannot_measure(
    tmp_path: Path,
) -> None:
    data = _ratings_file(tmp_path / "ratings.json")
    encoder = build_tiny_encoder(tmp_path / "encoder")
    out = tmp_path / "out"
    common = ["learning-curve", "--data", str(data), "--encoder", str(encoder)]
    args = [*common, "--sizes", "4,40", "--seeds", "2", "--routers", "random,prompt_length"]
    args += ["--pool-routers", "prompt_length,tfidf_ridge", "--out", str(out)]
    result = CliRunner().invoke(eval_app, args)
    assert result.exit_code == 0, result.output
    assert "tfidf_ridge" in result.output and "beats prompt_length" in result.output
    run = json.loads((out / "run.json").read_text())
    assert run["sizes"] == [4, 40] and run["cold_start"] == "prompt_length"
    assert run["experiments"] == ["SDXL_2_1->DALLE_3", "three"]
    with (out / "learning_curve.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 2 * (2 + 2)
    for bad, message in (
        (["--sizes", f"4,{PROMPTS}"], "n must lie"),
        (["--sizes", "4,40", "--routers", "random"], "cold-start"),
        (["--sizes", "4,40", "--pairs", "", "--pools", ""], "no pair and no pool"),
    ):
        refused = CliRunner().invoke(eval_app, [*common, *bad, "--out", str(tmp_path / "no")])
        assert refused.exit_code == 2, refused.output
        assert message in refused.output
    assert not (tmp_path / "no").exists()
