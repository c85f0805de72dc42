"""Evaluation data as ``PairTable``s: the GenAI-Bench human ratings (one score per image) and
tables with one column per metric and tier (the multi-metric shape the quality worker makes).

The data is never copied into the repository: the default GenAI-Bench path is the shared data
folder beside the checkout, and every loader takes an explicit path.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routing.metrics import DEFAULT_WEIGHTS, METRIC_NAMES
from routing.types import PairTable, PoolTable

GENAI_BENCH_MODELS: tuple[str, ...] = (
    "SDXL_2_1",
    "SDXL_Turbo",
    "SDXL_Base",
    "DeepFloyd_I_XL_v1",
    "Midjourney_6",
    "DALLE_3",
)

RATING_METRIC = "rating"


def default_ratings_path() -> Path:
    """``../shared/data/genai_bench_image_ratings.json`` seen from the repository root."""
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data" / "genai_bench_image_ratings.json"


RATING_SCALE = (1.0, 5.0)


def mean_rating(ratings: Sequence[float]) -> float:
    """The mean of the ratings on the 1-5 scale. A rating off the scale is a data-entry error
    (the published file has two: ``[5, 41, 4]`` and ``[3, 3, 33]``) and is left out rather
    than let one prompt's gap outweigh a dozen others."""
    low, high = RATING_SCALE
    valid = [float(r) for r in ratings if low <= r <= high]
    if not valid:
        raise ValueError(f"no rating on the {low:g}-{high:g} scale in {list(ratings)}")
    return float(np.mean(valid))


def load_genai_bench(edge: str, cloud: str, path: Path | None = None) -> PairTable:
    """The edge/cloud pair of GenAI-Bench as a single-score table.

    Quality is the mean of the three human alignment ratings (1 to 5; see ``mean_rating``
    for the two off-scale entries), so ``metrics`` is
    ``("rating",)``. Prompts keep the file's id order, so every pair of the same file shares
    one prompt order and the same folds can be used across pairs.
    """
    source = path if path is not None else default_ratings_path()
    records: dict[str, dict[str, Any]] = json.loads(Path(source).read_text())
    if not records:
        raise ValueError(f"{source} holds no prompts")
    known = sorted(next(iter(records.values()))["models"])
    for name, role in ((edge, "edge"), (cloud, "cloud")):
        if name not in known:
            raise ValueError(f"unknown {role} model {name!r}; known: {', '.join(known)}")
    if edge == cloud:
        raise ValueError(f"edge and cloud are the same model {edge!r}")
    ids = sorted(records)
    prompts = tuple(records[i]["prompt"] for i in ids)
    edge_q = np.array([[mean_rating(records[i]["models"][edge])] for i in ids])
    cloud_q = np.array([[mean_rating(records[i]["models"][cloud])] for i in ids])
    return PairTable(prompts=prompts, edge=edge_q, cloud=cloud_q, metrics=(RATING_METRIC,))


def load_genai_bench_pool(
    models: Sequence[str] = GENAI_BENCH_MODELS, path: Path | None = None
) -> PoolTable:
    """Several GenAI-Bench models as one single-score pool, tiers in the given order (the first
    is the reference tier). Quality and prompt order as in ``load_genai_bench``, so
    ``load_genai_bench_pool((e, c)).pair(e, c)`` equals ``load_genai_bench(e, c)``."""
    source = path if path is not None else default_ratings_path()
    records: dict[str, dict[str, Any]] = json.loads(Path(source).read_text())
    if not records:
        raise ValueError(f"{source} holds no prompts")
    known = sorted(next(iter(records.values()))["models"])
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {', '.join(known)}")
    ids = sorted(records)
    quality = np.array(
        [[[mean_rating(records[i]["models"][m])] for m in models] for i in ids], dtype=np.float64
    )
    prompts = tuple(records[i]["prompt"] for i in ids)
    return PoolTable(prompts, quality, tuple(models), (RATING_METRIC,))


def load_metric_table(path: Path) -> PairTable:
    """A CSV or JSON (list of objects) table with ``prompt``, ``edge_<m>`` and ``cloud_<m>``.

    The metrics are the names that have both an edge and a cloud column, in the order of the
    edge columns; an edge column without its cloud twin (or the reverse) is an error rather
    than silently dropped, since it usually means a misspelt header.
    """
    rows = _read_rows(Path(path))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    columns = list(rows[0])
    if "prompt" not in columns:
        raise ValueError(f"{path} has no 'prompt' column; columns: {columns}")
    edge_metrics = [c.removeprefix("edge_") for c in columns if c.startswith("edge_")]
    cloud_metrics = {c.removeprefix("cloud_") for c in columns if c.startswith("cloud_")}
    unpaired = set(edge_metrics) ^ cloud_metrics
    if unpaired:
        raise ValueError(f"{path}: metrics without both edge_ and cloud_ columns: {unpaired}")
    if not edge_metrics:
        raise ValueError(f"{path} has no edge_<metric>/cloud_<metric> columns")
    try:
        edge = np.array([[float(r[f"edge_{m}"]) for m in edge_metrics] for r in rows])
        cloud = np.array([[float(r[f"cloud_{m}"]) for m in edge_metrics] for r in rows])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: a row has a missing or non-numeric score: {exc}") from exc
    prompts = tuple(str(r["prompt"]) for r in rows)
    return PairTable(prompts=prompts, edge=edge, cloud=cloud, metrics=tuple(edge_metrics))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path} must hold a JSON list of objects")
        return rows
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    raise ValueError(f"{path}: expected a .csv or .json table")


def metric_weights(
    metrics: Sequence[str], weights: Mapping[str, float] | None = None
) -> np.ndarray:
    """Weights over ``metrics`` that sum to one.

    Given weights are looked up by name. Without them the ten contrastive metrics take
    ``routing.metrics.DEFAULT_WEIGHTS`` (renormalised over the ones present) and any other
    metric set is weighted equally; a single-score table gets weight one.
    """
    if weights is not None:
        missing = [m for m in metrics if m not in weights]
        if missing:
            raise ValueError(f"no weight for metrics {missing}")
        raw = np.array([weights[m] for m in metrics], dtype=np.float64)
    elif set(metrics) <= set(METRIC_NAMES):
        by_name = dict(zip(METRIC_NAMES, DEFAULT_WEIGHTS, strict=True))
        raw = np.array([by_name[m] for m in metrics], dtype=np.float64)
    else:
        raw = np.ones(len(metrics), dtype=np.float64)
    if np.any(raw < 0) or raw.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {raw}")
    normalised: np.ndarray = raw / raw.sum()
    return normalised


def scalar_quality(
    table: PairTable, weights: Mapping[str, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt scalar quality (edge, cloud): the weighted mean of the metric scores.

    This is what the harness averages over the routed mix; for a single-score table it is
    the score itself.
    """
    w = metric_weights(table.metrics, weights)
    edge: np.ndarray = table.edge @ w
    cloud: np.ndarray = table.cloud @ w
    return edge, cloud


def pool_scalar_quality(table: PoolTable, weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Per-prompt scalar quality of every tier (n, tiers): the weighted mean of the metrics."""
    result: np.ndarray = table.quality @ metric_weights(table.metrics, weights)
    return result


def cloud_preference(table: PairTable, weights: Mapping[str, float] | None = None) -> np.ndarray:
    """1 where the cloud image is better, 0 where the edge image is, 1/2 on a tie.

    The soft label of the learned baselines, as RouteLLM counts a tie as half a win; with
    human ratings in steps of 1/3 ties are frequent, and calling them edge wins would teach
    the classifiers a bias the data does not hold.
    """
    edge, cloud = scalar_quality(table, weights)
    label: np.ndarray = 0.5 * (1.0 + np.sign(cloud - edge))
    return label
