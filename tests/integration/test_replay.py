"""The replay on a slice of GenAI-Bench, on the real test PostgreSQL: it finishes in seconds
and its accounting reconciles with what the database holds (spend is the sum of the tier
costs of every generation, labels are the explored requests, promotions and refusals are
the gate's events), for the learning loop and for a static policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routing.data import default_ratings_path, load_genai_bench_pool
from routing.types import PoolTable
from workers.offline.replay import ReplayConfig, run_replay, stream_order
from workers.offline.replay_report import markdown, plot, summarise_run, write_csv

pytestmark = pytest.mark.skipif(
    not default_ratings_path().exists(), reason="the GenAI-Bench ratings are not beside the repo"
)

SLICE = ReplayConfig(
    limit=90, batch=15, retrain_every=30, retrain_min_pairs=12, exploration_rate=0.4
)


@pytest.fixture(scope="module")
def table() -> PoolTable:
    return load_genai_bench_pool(SLICE.models)


def test_the_loop_reconciles_with_the_database(
    table: PoolTable, clean_db: str, tmp_path: Path
) -> None:
    run = run_replay(SLICE, table, tmp_path, database_url=clean_db)
    db = run.database
    assert db["requests"] == len(run.quality) == 90
    assert db["spend"] == pytest.approx(float(run.spend.sum()))
    # Every generation beyond the cheapest costs its extra; the keeper charged exactly that.
    images = 1 + np.array([len(e) for e in run.explored])
    assert float(run.extra_spend.sum()) == pytest.approx(
        float(run.spend.sum() - run.costs.min() * images.sum())
    )
    assert db["explored"] == run.labels == db["labelled_pairs"] > 0
    statuses = [r.status for r in run.retrainings]
    assert db["promoted_events"] == statuses.count("promoted")
    assert db["refused_events"] == statuses.count("refused")
    assert db["router_versions"] == statuses.count("promoted") + statuses.count("refused")
    assert len(run.retrainings) == 3
    # The budget bound of the keeper holds for all generations, explorations included.
    burst = 5.0 * float(run.costs.max() - run.costs.min())
    assert run.extra_spend.sum() <= run.budget_per_request * len(run.quality) + burst + 1e-9


def test_a_static_policy_neither_explores_nor_retrains(
    table: PoolTable, clean_db: str, tmp_path: Path
) -> None:
    run = run_replay(SLICE.static("prompt_length"), table, tmp_path, database_url=clean_db)
    assert run.labels == 0 and not run.retrainings
    assert run.database["router_versions"] == 0
    assert set(run.router_version) == {"baseline:prompt_length"}


def test_a_replay_refuses_a_database_in_use(
    table: PoolTable, clean_db: str, tmp_path: Path
) -> None:
    run_replay(SLICE.static("random"), table, tmp_path / "a", database_url=clean_db)
    with pytest.raises(ValueError, match="empty database"):
        run_replay(SLICE.static("random"), table, tmp_path / "b", database_url=clean_db)


def test_reports_are_written(table: PoolTable, tmp_path: Path) -> None:
    runs = [run_replay(SLICE.static(p), table) for p in ("prompt_length", "noun_count")]
    write_csv(runs, 30, tmp_path)
    plot(runs, 30, tmp_path / "replay.png")
    text = markdown([summarise_run(r, 30) for r in runs], "t2iroute eval replay --limit 90")
    assert "recorded ratings" in text and "static:noun_count" in text
    assert (tmp_path / "windows.csv").read_text().count("\n") == 1 + 2 * 3
    assert (tmp_path / "replay.png").stat().st_size > 10_000


def test_stream_orders() -> None:
    prompts = ["a cat", "two dogs and no cat", "a very long prompt about a house", "one bird"]
    assert sorted(stream_order(prompts, "shuffle", 1)) == [0, 1, 2, 3]
    by_length = stream_order(prompts, "length", 1)
    assert [len(prompts[i]) for i in by_length] == sorted(len(p) for p in prompts)
    switched = list(stream_order(prompts, "switch", 1))
    assert set(switched[:2]) == {0, 2} and set(switched[2:]) == {1, 3}
    with pytest.raises(ValueError, match="unknown order"):
        stream_order(prompts, "random", 0)
