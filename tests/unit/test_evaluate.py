"""The harness: routing curves and their summaries, the folds, and one end-to-end run of
training and evaluation (Python API and ``t2iroute eval table``) on small synthetic tables."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routing.encoder import FrozenTextEncoder
from routing.encodings import SharedEncoding
from routing.evaluate import (
    GAIN_TARGETS,
    SHARES,
    Experiment,
    FoldContext,
    FoldScore,
    cross_validate,
    cumulative_gain,
    kfold_indices,
    paired_differences,
    router_factories,
    score_routing,
    summarise,
)
from routing.reports import summary_markdown
from routing.types import PairTable, Router
from tests.unit.test_baselines import hard_mask, word_table
from tests.unit.tiny_text_encoder import build_tiny_encoder
from workers.entrypoints.cli.eval import eval_app


def test_cumulative_gain_follows_the_ranking() -> None:
    prs = np.array([0.9, 0.1, 0.5, 0.3])
    gain = np.array([1.0, 4.0, 2.0, 3.0])
    np.testing.assert_allclose(cumulative_gain(prs, gain, np.arange(5)), [0, 4, 7, 9, 10])
    np.testing.assert_allclose(cumulative_gain(prs, gain, np.array([1.5])), [5.5])


def test_ties_get_their_expected_gain() -> None:
    """A block of equal predictions cannot be ordered: each member is worth the block mean."""
    prs = np.array([0.2, 0.5, 0.5, 0.5])
    gain = np.array([1.0, 3.0, 0.0, 6.0])
    np.testing.assert_allclose(cumulative_gain(prs, gain, np.arange(5)), [0, 1, 4, 7, 10])


def test_constant_predictions_give_the_straight_line() -> None:
    rng = np.random.default_rng(0)
    edge, cloud = rng.uniform(1, 5, 40), rng.uniform(1, 5, 40) + 1.0
    quality, recovered, apgr, dp50, share_at = score_routing(np.zeros(40), edge, cloud)
    np.testing.assert_allclose(recovered, SHARES, atol=1e-12)
    np.testing.assert_allclose(quality, edge.mean() + SHARES * (cloud - edge).mean())
    assert apgr == pytest.approx(0.5)
    assert dp50 == pytest.approx(50.0)
    assert share_at == pytest.approx({0.4: 0.4, 0.5: 0.5, 0.6: 0.6})


def test_perfect_and_reversed_rankings_bracket_the_line() -> None:
    edge = np.array([3.0, 3.0, 3.0, 3.0])
    cloud = np.array([5.0, 4.0, 3.0, 2.0])  # gains 2, 1, 0, -1; total 2
    gain = cloud - edge
    best = score_routing(-gain, edge, cloud)
    worst = score_routing(gain, edge, cloud)
    # Best order: recovered 0, 1, 1.5, 1.5, 1 at k = 0..4; at p = 1/2 (k = 2) it is 1.5.
    assert best[3] == pytest.approx(150.0)
    assert best[4] == pytest.approx({0.4: 0.25, 0.5: 0.25, 0.6: 0.25})
    assert worst[3] == pytest.approx(-50.0)
    assert worst[4] == pytest.approx({0.4: 1.0, 0.5: 1.0, 0.6: 1.0})
    assert best[2] > 0.5 > worst[2]
    assert best[0][0] == worst[0][0] == 3.0 and best[0][-1] == worst[0][-1] == 3.5


def test_a_fold_without_cloud_gain_is_not_normalised() -> None:
    _, recovered, apgr, dp50, share_at = score_routing(
        np.arange(3.0), np.array([3.0, 3.0, 3.0]), np.array([2.0, 4.0, 3.0])
    )
    assert np.isnan(apgr) and np.isnan(dp50) and np.all(np.isnan(recovered))
    assert all(np.isnan(v) for v in share_at.values())


def test_shares_must_span_zero_to_one() -> None:
    with pytest.raises(ValueError, match="shares"):
        score_routing(np.zeros(3), np.zeros(3), np.ones(3), shares=np.array([0.0, 0.5]))


def test_kfold_indices_partition_reproducibly() -> None:
    folds = kfold_indices(23, 5, seed=7)
    joined = np.concatenate(folds)
    assert sorted(joined) == list(range(23))
    assert [len(f) for f in folds] == [5, 5, 5, 4, 4]
    assert all(np.array_equal(a, b) for a, b in zip(folds, kfold_indices(23, 5, 7), strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(folds, kfold_indices(23, 5, 8), strict=True)
    )
    with pytest.raises(ValueError, match="folds"):
        kfold_indices(3, 5, 0)


class SpyRouter:
    """Records what it was trained on and asked about; scores by prompt length."""

    name = "spy"

    def __init__(self, log: list[tuple[set[str], list[str]]]) -> None:
        self.log = log
        self.seen: set[str] = set()

    def fit(self, train: PairTable) -> None:
        self.seen = set(train.prompts)

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        self.log.append((self.seen, list(prompts)))
        return -np.array([len(p) for p in prompts], dtype=np.float64)


def test_cross_validation_never_scores_a_seen_prompt() -> None:
    table = word_table()
    other = PairTable(table.prompts, table.cloud, table.edge, table.metrics)
    log: list[tuple[set[str], list[str]]] = []

    def spy(context: FoldContext) -> Router:
        return SpyRouter(log)

    experiments = [Experiment.same_pair("same", table), Experiment("cross", table, other)]
    steps: list[str] = []
    scores = cross_validate(experiments, {"spy": spy}, folds=4, seeds=(0, 1), on_step=steps.append)
    assert len(scores) == len(log) == len(steps) == 2 * 2 * 4
    for seen, asked in log:
        assert seen.isdisjoint(asked)
        assert len(seen) + len(asked) == len(table)
    for start in range(0, len(log), 4):  # one experiment and seed: every prompt scored once
        assert sorted(p for _, asked in log[start : start + 4] for p in asked) == sorted(
            table.prompts
        )


def test_experiment_needs_the_same_prompts() -> None:
    table = word_table()
    with pytest.raises(ValueError, match="same prompts"):
        Experiment("bad", table, table.take(np.arange(len(table) - 1)))


def test_summaries_average_over_folds() -> None:
    table = word_table()
    scores = cross_validate(
        [Experiment.same_pair("t", table)],
        router_factories(["random", "oracle"]),
        folds=3,
        seeds=(0, 1),
    )
    summaries = {s.router: s for s in summarise(scores)}
    oracle = [s for s in scores if s.router == "oracle"]
    assert summaries["oracle"].runs == summaries["oracle"].valid == 6
    assert summaries["oracle"].apgr[0] == pytest.approx(np.mean([s.apgr for s in oracle]))
    assert summaries["oracle"].apgr[1] == pytest.approx(np.std([s.apgr for s in oracle], ddof=1))
    np.testing.assert_allclose(summaries["oracle"].quality, np.mean([s.quality for s in oracle], 0))


def fold_score(router: str, seed: int, fold: int, delta_p50: float) -> FoldScore:
    return FoldScore(
        experiment="e",
        router=router,
        seed=seed,
        fold=fold,
        edge_quality=2.0,
        cloud_quality=3.0,
        quality=np.zeros(len(SHARES)),
        recovered=np.zeros(len(SHARES)),
        apgr=delta_p50 / 100.0,
        delta_p50=delta_p50,
        share_at=dict.fromkeys(GAIN_TARGETS, 0.5),
    )


def test_paired_differences_compare_fold_by_fold() -> None:
    """Differences are taken per (seed, fold); the standard error divides the spread by the
    square root of the folds of one seed, not of every run; a tie counts half a win; a fold
    that either router could not normalise is left out of both."""
    mine = {(0, 0): 70.0, (0, 1): 60.0, (1, 0): 80.0, (1, 1): 50.0, (2, 0): 1.0, (2, 1): 1.0}
    theirs = {(0, 0): 65.0, (0, 1): 60.0, (1, 0): 70.0, (1, 1): 52.0, (2, 0): 0.0}
    theirs[(2, 1)] = float("nan")
    scores = [fold_score("a", s, f, v) for (s, f), v in mine.items()]
    scores += [fold_score("b", s, f, v) for (s, f), v in theirs.items()]
    [difference] = paired_differences(scores, "a")
    assert (difference.router, difference.against, difference.runs) == ("a", "b", 5)
    expected = np.array([5.0, 0.0, 10.0, -2.0, 1.0])
    mean, se = difference.delta_p50
    assert mean == pytest.approx(expected.mean())
    # Five runs over three seeds: one seed's folds (5 // 3 = 1) are the independent samples.
    assert se == pytest.approx(expected.std(ddof=1) / np.sqrt(1))
    assert difference.apgr[0] == pytest.approx(expected.mean() / 100.0)
    assert difference.wins == pytest.approx((3 + 0.5) / 5)
    assert paired_differences(scores, "missing") == []
    markdown = summary_markdown(
        summarise(scores), {"command": "c", "wall_seconds": 1, "seeds": 3, "folds": 2}, [difference]
    )
    assert f"| b | {mean:+.1f} ± {se:.1f} (70%) |" in markdown


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> SharedEncoding:
    torch.set_num_threads(1)
    path = build_tiny_encoder(tmp_path_factory.mktemp("encoder"))
    return SharedEncoding(FrozenTextEncoder(path))


def test_end_to_end_routers_beat_random_when_the_prompt_decides(shared: SharedEncoding) -> None:
    """On a table whose label depends on the prompt's words, the oracle and a learned router
    recover far more of the cloud's gain than random routing, which stays near the line."""
    table = word_table()
    assert hard_mask(table.prompts).any()
    names = ["random", "prompt_length", "sw_ranking", "zooter", "oracle"]
    scores = cross_validate(
        [Experiment.same_pair("words", table)],
        router_factories(names, shared),
        folds=5,
        seeds=(0,),
    )
    apgr = {s.router: s.apgr[0] for s in summarise(scores)}
    dp50 = {s.router: s.delta_p50[0] for s in summarise(scores)}
    assert abs(apgr["random"] - 0.5) < 0.15
    assert apgr["oracle"] > apgr["random"] + 0.3
    assert apgr["sw_ranking"] > apgr["random"] + 0.15
    assert apgr["zooter"] > apgr["random"] + 0.15
    assert dp50["oracle"] > 100.0
    assert dp50["sw_ranking"] > dp50["random"] + 20.0


def test_multi_metric_tables_are_scored_on_the_weighted_mean(shared: SharedEncoding) -> None:
    base = word_table()
    n = len(base)
    # Two metrics that disagree: only their mean says the hard prompts gain from the cloud.
    edge = np.column_stack([base.edge[:, 0] - 1.0, base.edge[:, 0] + 1.0])
    cloud = np.column_stack([base.cloud[:, 0] + 1.0, base.cloud[:, 0] - 1.0])
    table = PairTable(base.prompts, edge, cloud, ("m1", "m2"))
    scores = cross_validate(
        [Experiment.same_pair("two", table)], router_factories(["oracle"], shared), seeds=(0,)
    )
    single = cross_validate(
        [Experiment.same_pair("one", base)], router_factories(["oracle"], shared), seeds=(0,)
    )
    assert len(scores) == 5 and n == len(table)
    for multi, one in zip(scores, single, strict=True):
        assert multi.apgr == pytest.approx(one.apgr)


def write_csv(path: Path, table: PairTable, cloud_bonus: float = 0.0) -> None:
    edge, cloud = table.edge, table.cloud + cloud_bonus
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "edge_rating", "cloud_rating"])
        writer.writerows(zip(table.prompts, edge[:, 0], cloud[:, 0], strict=True))


def test_eval_table_cli_writes_reports(tmp_path: Path) -> None:
    path, other = tmp_path / "words.csv", tmp_path / "other.csv"
    write_csv(path, word_table())
    write_csv(other, word_table(), cloud_bonus=0.5)
    out = tmp_path / "report"
    args = ["table", str(path), "--test-file", str(other), "--out", str(out)]
    args += ["--routers", "random,prompt_length,oracle", "--seeds", "1", "--folds", "3"]
    result = CliRunner().invoke(eval_app, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {
        "summary.md",
        "summary.csv",
        "folds.csv",
        "curves.csv",
        "run.json",
        "curves_words.png",
        "curves_words_on_other.png",
    }
    for png in out.glob("*.png"):
        assert 0 < png.stat().st_size < 200_000
    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3
    apgr = {(r["experiment"], r["router"]): float(r["apgr_mean"]) for r in rows}
    for experiment in ("words", "words => other"):
        assert apgr[(experiment, "oracle")] > apgr[(experiment, "random")] + 0.2
    assert "| oracle |" in (out / "summary.md").read_text()
    assert json.loads((out / "run.json").read_text())["folds"] == 3
    with (out / "folds.csv").open() as handle:
        assert sum(1 for _ in handle) == 1 + 2 * 3 * 3


def test_eval_rejects_unknown_routers(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("prompt,edge_r,cloud_r\na,1,2\nb,2,1\nc,1,1\n")
    result = CliRunner().invoke(eval_app, ["table", str(path), "--routers", "nope"])
    assert result.exit_code != 0
    assert "unknown routers" in result.output


def test_eval_on_another_encoder(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """``--encoder`` puts every learned router on the chosen encoder (here the text tower of a
    whole CLIP checkpoint) and ``--encoder-layer`` sets RouteT2I's layer; the report says so
    and compares RouteT2I with the others fold by fold."""
    path = tmp_path / "words.csv"
    write_csv(path, word_table())
    out = tmp_path / "report"
    clip = str(tiny_models["clip"])
    args = ["table", str(path), "--out", str(out), "--encoder", clip, "--encoder-layer", "-2"]
    args += ["--routers", "random,sw_ranking,routet2i", "--seeds", "1", "--folds", "2"]
    result = CliRunner().invoke(eval_app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["encoder"] == clip and run["routet2i_encoder_layer"] == -2
    with (out / "paired.csv").open() as handle:
        paired = list(csv.DictReader(handle))
    assert {(r["router"], r["against"]) for r in paired} == {
        ("routet2i", "random"),
        ("routet2i", "sw_ranking"),
    }
    assert all(int(r["runs"]) == 2 for r in paired)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--encoder", "/no/such/encoder"], "/no/such/encoder"),
        (["--encoder-layer", "99"], "out of range"),
        (["--encoder", "CLIP", "--routers", "bert_classifier"], "BERT-family"),
    ],
)
def test_eval_refuses_an_unusable_encoder_before_training(
    tmp_path: Path, tiny_models: dict[str, Path], extra: list[str], message: str
) -> None:
    path = tmp_path / "t.csv"
    write_csv(path, word_table())
    extra = [str(tiny_models["clip"]) if a == "CLIP" else a for a in extra]
    result = CliRunner().invoke(eval_app, ["table", str(path), "--out", str(tmp_path), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "summary.md").exists()
