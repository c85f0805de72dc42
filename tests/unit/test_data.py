"""Loading evaluation tables: GenAI-Bench ratings and metric tables, weights and labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from routing.data import (
    cloud_preference,
    load_genai_bench,
    load_metric_table,
    metric_weights,
    scalar_quality,
)
from routing.metrics import METRIC_NAMES
from routing.types import PairTable

RATINGS = {
    "10": {"id": "10", "prompt": "a cat", "models": {"A": [1, 2, 3], "B": [5, 5, 5]}},
    "02": {"id": "02", "prompt": "two dogs", "models": {"A": [4, 4, 4], "B": [1, 1, 4]}},
}


@pytest.fixture
def ratings_file(tmp_path: Path) -> Path:
    path = tmp_path / "ratings.json"
    path.write_text(json.dumps(RATINGS))
    return path


def test_genai_bench_takes_mean_rating_in_id_order(ratings_file: Path) -> None:
    table = load_genai_bench("A", "B", ratings_file)
    assert table.prompts == ("two dogs", "a cat")
    assert table.metrics == ("rating",)
    np.testing.assert_allclose(table.edge[:, 0], [4.0, 2.0])
    np.testing.assert_allclose(table.cloud[:, 0], [2.0, 5.0])


@pytest.mark.parametrize(("edge", "cloud"), [("A", "C"), ("C", "B"), ("A", "A")])
def test_genai_bench_rejects_bad_pairs(ratings_file: Path, edge: str, cloud: str) -> None:
    with pytest.raises(ValueError, match="model"):
        load_genai_bench(edge, cloud, ratings_file)


def test_genai_bench_pairs_share_prompt_order(ratings_file: Path) -> None:
    assert load_genai_bench("A", "B", ratings_file).prompts == (
        load_genai_bench("B", "A", ratings_file).prompts
    )


def test_metric_table_from_csv_and_json_agree(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a cat", "edge_clarity": 0.1, "edge_color": 0.2, "cloud_clarity": 0.3,
         "cloud_color": 0.4},
        {"prompt": "a dog", "edge_clarity": 0.5, "edge_color": 0.6, "cloud_clarity": 0.7,
         "cloud_color": 0.8},
    ]  # fmt: skip
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(
        "prompt,edge_clarity,edge_color,cloud_clarity,cloud_color\n"
        + "\n".join(",".join(str(r[k]) for k in rows[0]) for r in rows)
        + "\n"
    )
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps(rows))
    for path in (csv_path, json_path):
        table = load_metric_table(path)
        assert table.metrics == ("clarity", "color")
        assert table.prompts == ("a cat", "a dog")
        np.testing.assert_allclose(table.edge, [[0.1, 0.2], [0.5, 0.6]])
        np.testing.assert_allclose(table.cloud, [[0.3, 0.4], [0.7, 0.8]])


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        ("text,edge_a,cloud_a", "x,1,2", "no 'prompt' column"),
        ("prompt,edge_a,cloud_b", "x,1,2", "without both"),
        ("prompt,edge_a,cloud_a", "x,1,oops", "non-numeric"),
        ("prompt,score", "x,1", "no edge_"),
    ],
)
def test_metric_table_errors(tmp_path: Path, header: str, row: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(ValueError, match=message):
        load_metric_table(path)


def test_metric_table_rejects_other_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "table.tsv"
    path.write_text("prompt\tedge_a\tcloud_a\n")
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        load_metric_table(path)


def test_metric_weights() -> None:
    np.testing.assert_allclose(metric_weights(METRIC_NAMES), np.full(10, 0.1))
    np.testing.assert_allclose(metric_weights(("clarity", "color")), [0.5, 0.5])
    np.testing.assert_allclose(metric_weights(("x", "y"), {"x": 3.0, "y": 1.0}), [0.75, 0.25])
    np.testing.assert_allclose(metric_weights(("rating",)), [1.0])
    with pytest.raises(ValueError, match="no weight"):
        metric_weights(("x", "y"), {"x": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        metric_weights(("x", "y"), {"x": -1.0, "y": 1.0})


def test_scalar_quality_and_preference_count_ties_as_half() -> None:
    table = PairTable(
        prompts=("a", "b", "c"),
        edge=np.array([[1.0, 3.0], [2.0, 2.0], [4.0, 4.0]]),
        cloud=np.array([[3.0, 3.0], [2.0, 2.0], [1.0, 1.0]]),
        metrics=("m1", "m2"),
    )
    edge, cloud = scalar_quality(table, {"m1": 1.0, "m2": 1.0})
    np.testing.assert_allclose(edge, [2.0, 2.0, 4.0])
    np.testing.assert_allclose(cloud, [3.0, 2.0, 1.0])
    np.testing.assert_allclose(cloud_preference(table), [1.0, 0.5, 0.0])
    # Weighting only the first metric: "a" is still a cloud win (1 < 3).
    np.testing.assert_allclose(cloud_preference(table, {"m1": 1.0, "m2": 0.0}), [1.0, 0.5, 0.0])


def test_ratings_off_the_scale_are_left_out_of_the_mean() -> None:
    from routing.data import mean_rating

    assert mean_rating([5, 41, 4]) == 4.5
    assert mean_rating([1, 2, 3]) == 2.0
    with pytest.raises(ValueError, match="no rating"):
        mean_rating([0, 6])
