"""The two shapes every router and the harness share: a table of labelled pairs and the
router interface (after RouteLLM: a router scores a prompt; a threshold makes the choice)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class PairTable:
    """Prompts with the quality of the edge and the cloud image on each metric.

    ``edge`` and ``cloud`` have shape (n_prompts, n_metrics); a single-score data set
    (one human rating per image) has n_metrics == 1.
    """

    prompts: tuple[str, ...]
    edge: np.ndarray
    cloud: np.ndarray
    metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        n, m = len(self.prompts), len(self.metrics)
        for name, arr in (("edge", self.edge), ("cloud", self.cloud)):
            if arr.shape != (n, m):
                raise ValueError(f"{name} has shape {arr.shape}, expected {(n, m)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} holds non-finite values")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def single_score(self) -> bool:
        return len(self.metrics) == 1

    def take(self, index: Sequence[int] | np.ndarray) -> PairTable:
        idx = np.asarray(index, dtype=np.int64)
        return PairTable(
            prompts=tuple(self.prompts[i] for i in idx),
            edge=self.edge[idx],
            cloud=self.cloud[idx],
            metrics=self.metrics,
        )


@runtime_checkable
class Router(Protocol):
    """Predicts, per prompt and before any image exists, the Pareto relative superiority
    of the edge image over the cloud image: PRS > 0.5 edge better, PRS < 0.5 cloud better.
    Only the order of the predictions matters to the policy; calibration picks the threshold.
    """

    @property
    def name(self) -> str: ...

    def fit(self, train: PairTable) -> None: ...

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray: ...


@runtime_checkable
class PersistentRouter(Router, Protocol):
    """A router that can be saved to a directory and loaded back by ``routing.registry``."""

    @property
    def kind(self) -> str: ...

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Self: ...
