"""Labelled pairs made offline: every prompt generated on both tiers and scored on every metric.

What the exploration path of the running system collects one request at a time (DESIGN.md,
Flow), made here in one pass, so the router can be trained and evaluated on a table
(``routing.data.load_metric_table`` reads what ``write_metric_table`` writes) without any
server running.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from routing.quality import ContrastiveQualityScorer
from routing.types import PairTable
from workers.services.pipelines import generate

# Prompts generated (on both tiers) before their images are scored and dropped: bounds the
# images held in memory, while CLIP still sees batches.
SCORE_BATCH = 16


def make_pair_table(
    prompts: Sequence[str],
    edge_pipe: DiffusionPipeline,
    cloud_pipe: DiffusionPipeline,
    scorer: ContrastiveQualityScorer,
    *,
    width: int,
    height: int,
    steps: int,
    seed: int,
) -> PairTable:
    """The quality of each prompt's edge and cloud image on each of the scorer's metrics.

    Prompt ``i`` is generated with seed ``seed + i`` on both tiers: the two images of a pair
    start from the same seed, as a request's dual generation does, and the table does not
    depend on how it is batched.
    """
    if not prompts:
        raise ValueError("no prompts to generate")
    edge_rows: list[np.ndarray] = []
    cloud_rows: list[np.ndarray] = []
    for start in range(0, len(prompts), SCORE_BATCH):
        chunk = prompts[start : start + SCORE_BATCH]
        for tier_pipe, rows in ((edge_pipe, edge_rows), (cloud_pipe, cloud_rows)):
            images = [
                generate(
                    tier_pipe,
                    prompt,
                    width=width,
                    height=height,
                    steps=steps,
                    seed=seed + start + i,
                )
                for i, prompt in enumerate(chunk)
            ]
            rows.append(scorer.score(images))
    return PairTable(
        prompts=tuple(prompts),
        edge=np.concatenate(edge_rows),
        cloud=np.concatenate(cloud_rows),
        metrics=scorer.metric_names,
    )


def write_metric_table(table: PairTable, path: Path) -> None:
    """CSV with ``prompt``, then ``edge_<metric>`` and ``cloud_<metric>`` for every metric.

    Scores are written with ``repr``, which round-trips a float exactly.
    """
    header = ["prompt"]
    header += [f"edge_{m}" for m in table.metrics]
    header += [f"cloud_{m}" for m in table.metrics]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for prompt, edge, cloud in zip(table.prompts, table.edge, table.cloud, strict=True):
            writer.writerow([prompt, *map(repr, map(float, edge)), *map(repr, map(float, cloud))])
