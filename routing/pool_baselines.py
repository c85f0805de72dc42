"""Routers that predict a score for every tier of a pool (``routing.types.PoolRouter``):

* ``RandomPoolRouter``: the training mean of each tier plus uniform noise from a hash of
  (seed, prompt, tier): a prompt-blind router with random tie-breaking, the chance line;
* ``PromptLengthPoolRouter``: per tier, a least-squares line of quality on the word count;
* ``KnnQualityRouter``: CATImage's quality estimator by k-nearest neighbours (Li et al. 2025):
  per tier, the similarity-weighted mean quality of the k training prompts nearest to the
  query on the pooled MiniLM embedding;
* ``RidgeQualityRouter``: CATImage's regressor variant, a ridge regression per tier on the
  same embedding (closed form, all tiers in one solve);
* ``TfidfRidgeRouter``: a ridge regression per tier on TF-IDF word and bigram features, the
  estimator of the first measurement outside the project (its exact settings were not kept);
* ``MatrixFactorisationPoolRouter``: RouteLLM's matrix factorisation generalised to N models,
  ``s(m, q) = w^T (v_m * W q) + b_m`` trained on every pair of tiers of every training prompt
  with a Bradley-Terry loss (tie = 1/2); the score is in log-odds units, not ratings;
* ``OraclePoolRouter``: the true quality of the test prompts, the upper bound.

All of them see the scalar quality (``routing.data.pool_scalar_quality``).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from routing.baselines import WORD
from routing.data import pool_scalar_quality
from routing.embedding_baselines import FitSettings, PooledEmbeddings
from routing.types import PoolTable


def _not_fitted(name: str) -> RuntimeError:
    return RuntimeError(f"{name} is not fitted; call fit() first")


def _uniform(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class RandomPoolRouter:
    """Training mean per tier plus noise as wide as the spread of the tier means, so that at
    every lambda where tiers are close the choice among them is a coin flip per prompt."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._means: np.ndarray | None = None

    def fit(self, train: PoolTable) -> None:
        self._means = pool_scalar_quality(train).mean(axis=0)

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._means is None:
            raise _not_fitted(self.name)
        spread = max(float(np.ptp(self._means)), 1e-6)
        noise = np.array(
            [
                [_uniform(f"{self.seed}\x00{p}\x00{t}") for t in range(len(self._means))]
                for p in prompts
            ],
            dtype=np.float64,
        ).reshape(len(prompts), len(self._means))
        result: np.ndarray = self._means + spread * (noise - 0.5)
        return result


class PromptLengthPoolRouter:
    """Quality of each tier as a straight line in the number of words: weak models lose more
    on long compositional prompts, so the lines' slopes differ by tier."""

    name = "prompt_length"

    def __init__(self) -> None:
        self._coef: np.ndarray | None = None

    @staticmethod
    def _design(prompts: Sequence[str]) -> np.ndarray:
        words = np.array([len(WORD.findall(p)) for p in prompts], dtype=np.float64)
        return np.stack([np.ones_like(words), words], axis=1)

    def fit(self, train: PoolTable) -> None:
        self._coef = np.linalg.lstsq(
            self._design(train.prompts), pool_scalar_quality(train), rcond=None
        )[0]

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._coef is None:
            raise _not_fitted(self.name)
        result: np.ndarray = self._design(prompts) @ self._coef
        return result


class KnnQualityRouter:
    """Per tier, the mean quality of the ``k`` nearest training prompts weighted by
    ``base ** (sim / max_sim)`` (RouteLLM's similarity weighting, so near neighbours count
    more without a hard cut inside the k)."""

    name = "knn"

    def __init__(self, embeddings: PooledEmbeddings, *, k: int = 25, base: float = 10.0) -> None:
        if k < 1 or base <= 1.0:
            raise ValueError(f"need k >= 1 and base > 1, got k={k}, base={base}")
        self.embeddings, self.k, self.base = embeddings, k, base
        self._train: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, train: PoolTable) -> None:
        if len(train) == 0:
            raise ValueError("cannot fit on an empty table")
        vectors = self.embeddings(train.prompts).astype(np.float64)
        self._train = (vectors, pool_scalar_quality(train))

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._train is None:
            raise _not_fitted(self.name)
        vectors, quality = self._train
        similarity = self.embeddings(prompts).astype(np.float64) @ vectors.T
        k = min(self.k, similarity.shape[1])
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        sim = np.take_along_axis(similarity, nearest, axis=1)
        top = np.maximum(sim.max(axis=1, keepdims=True), 1e-6)
        weight = self.base ** (sim / top - 1.0)
        weight /= weight.sum(axis=1, keepdims=True)
        result: np.ndarray = np.einsum("nk,nkt->nt", weight, quality[nearest])
        return result


def _ridge(features: np.ndarray, target: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (d, t) and intercepts (t,) of ridge regression with an unpenalised
    intercept, every target column in one solve."""
    x_mean, y_mean = features.mean(axis=0), target.mean(axis=0)
    x, y = features - x_mean, target - y_mean
    gram = x.T @ x + alpha * np.eye(x.shape[1])
    coef = np.linalg.solve(gram, x.T @ y)
    intercept: np.ndarray = y_mean - x_mean @ coef
    return coef, intercept


class RidgeQualityRouter:
    """Ridge regression of each tier's quality on the pooled embedding."""

    name = "ridge"

    def __init__(self, embeddings: PooledEmbeddings, *, alpha: float = 1.0) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.embeddings, self.alpha = embeddings, alpha
        self._fitted: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, train: PoolTable) -> None:
        features = self.embeddings(train.prompts).astype(np.float64)
        self._fitted = _ridge(features, pool_scalar_quality(train), self.alpha)

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._fitted is None:
            raise _not_fitted(self.name)
        coef, intercept = self._fitted
        result: np.ndarray = self.embeddings(prompts).astype(np.float64) @ coef + intercept
        return result


class TfidfRidgeRouter:
    """Ridge regression of each tier's quality on TF-IDF features of words and bigrams
    (scikit-learn; sublinear term frequency, the vocabulary fitted on the training prompts)."""

    name = "tfidf_ridge"

    def __init__(self, *, alpha: float = 1.0) -> None:
        self.alpha = alpha
        self._fitted: tuple[Any, Any] | None = None

    def fit(self, train: PoolTable) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge

        vectoriser = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        features = vectoriser.fit_transform(train.prompts)
        model = Ridge(alpha=self.alpha).fit(features, pool_scalar_quality(train))
        self._fitted = (vectoriser, model)

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._fitted is None:
            raise _not_fitted(self.name)
        vectoriser, model = self._fitted
        result = np.asarray(model.predict(vectoriser.transform(list(prompts))), dtype=np.float64)
        return result.reshape(len(prompts), -1)


class MatrixFactorisationPoolRouter:
    """RouteLLM's MF over (prompt, model) for N models. Every training prompt gives one
    comparison per pair of tiers, labelled 1 when the dearer-indexed tier is rated higher,
    0 when lower, 1/2 on a tie; the loss is BCE on sigmoid(s(j, q) - s(i, q))."""

    name = "matrix_factorisation"

    def __init__(
        self,
        embeddings: PooledEmbeddings,
        *,
        dim: int = 128,
        fit: FitSettings = FitSettings(epochs=40),
        seed: int = 0,
    ) -> None:
        self.embeddings, self.dim, self.settings, self.seed = embeddings, dim, fit, seed
        self._model: Any = None

    def fit(self, train: PoolTable) -> None:
        import torch
        import torch.nn.functional as F

        from routing.mf_model import PoolMF

        quality = pool_scalar_quality(train)
        pairs = np.array(list(itertools.combinations(range(quality.shape[1]), 2)))
        label = 0.5 * (1.0 + np.sign(quality[:, pairs[:, 1]] - quality[:, pairs[:, 0]]))
        features = torch.from_numpy(self.embeddings(train.prompts))
        target = torch.tensor(label, dtype=torch.float32)
        first, second = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
        s = self.settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = PoolMF(features.shape[1], quality.shape[1], self.dim)
            optimiser = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
            generator = torch.Generator().manual_seed(self.seed)
            model.train()
            for _ in range(s.epochs):
                for batch in torch.randperm(len(target), generator=generator).split(s.batch_size):
                    score = model(features[batch])
                    logit = score[:, second] - score[:, first]
                    loss = F.binary_cross_entropy_with_logits(logit, target[batch])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
        self._model = model.eval()

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        import torch

        if self._model is None:
            raise _not_fitted(self.name)
        with torch.no_grad():
            score = self._model(torch.from_numpy(self.embeddings(prompts)))
        result: np.ndarray = score.double().numpy()
        return result


class OraclePoolRouter:
    """The upper bound: it reads the true quality of every tier for the prompts it routes.
    Never deploy or report it as a method."""

    name = "oracle"

    def __init__(self, table: PoolTable, weights: Mapping[str, float] | None = None) -> None:
        quality = pool_scalar_quality(table, weights)
        self._quality = dict(zip(table.prompts, quality, strict=True))

    def fit(self, train: PoolTable) -> None:
        """Nothing to learn: the answers were given at construction."""

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        missing = [p for p in prompts if p not in self._quality]
        if missing:
            raise KeyError(f"the oracle has no label for {len(missing)} prompts")
        return np.array([self._quality[p] for p in prompts], dtype=np.float64)
