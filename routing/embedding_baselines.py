"""Learned baselines over one frozen pooled prompt embedding (mean-pooled MiniLM, L2-normalised,
the way all-MiniLM-L6-v2 is meant to be pooled):

* ``SimilarityRankingRouter``: RouteLLM's similarity-weighted ranking (Ong et al., arXiv
  2406.18665, Sec. 4.1). RouteLLM fits a Bradley-Terry model to arena battles weighted by the
  similarity of each battle's prompt to the query; with two models and one comparison per
  training prompt the weighted Bradley-Terry MLE has a closed form, the weighted win rate.
* ``MatrixFactorisationRouter``: RouteLLM's matrix factorisation, score
  ``s(m, q) = w^T (v_m * W q)`` with P(cloud better) = sigmoid(s(cloud, q) - s(edge, q)).
* ``ZooterRouter``: ZOOTER's reward distillation (Lu et al., arXiv 2311.08692, Sec. 3): the
  router regresses the softmax over models of the normalised rewards, here the two tiers'
  scalar quality, with a KL loss (cross entropy against the soft target). ZOOTER's tag-based
  label enhancement needs query tags this data does not have and is left out.

All three use the scalar quality (``routing.data.scalar_quality``), so on a multi-metric table
they see the weighted mean of the metrics, not the metrics themselves.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from routing.data import cloud_preference, scalar_quality
from routing.encoder import FrozenTextEncoder
from routing.types import PairRouterBase, PairTable


class PooledEmbeddings:
    """Memo prompt -> pooled embedding, shared by the routers of a cross-validation run so that
    every prompt is encoded once whatever the number of folds, seeds and pairs."""

    def __init__(self, encoder: FrozenTextEncoder, batch_size: int = 128) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self._memo: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """(n, d) float32, rows of unit length."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._memo))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            self._memo.update(zip(chunk, self.encoder.pooled(chunk), strict=True))
        if not prompts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memo[p] for p in prompts])


def _not_fitted(name: str) -> RuntimeError:
    return RuntimeError(f"{name} is not fitted; call fit() first")


class SimilarityRankingRouter(PairRouterBase):
    """Weighted win rate of the cloud over the training prompts, each weighted by
    ``base ** (sim / max_sim)`` (RouteLLM's weighting; its constant factor cancels), sim the
    cosine similarity to the query. A tie counts half a win, as in RouteLLM's arena data.
    """

    name = "sw_ranking"

    def __init__(self, embeddings: PooledEmbeddings, base: float = 10.0) -> None:
        if base <= 1.0:
            raise ValueError(f"base must exceed 1, got {base}")
        self.embeddings, self.base = embeddings, base
        self._train: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, train: PairTable) -> None:
        if len(train) == 0:
            raise ValueError("cannot fit on an empty table")
        vectors = self.embeddings(train.prompts).astype(np.float64)
        self._train = (vectors, cloud_preference(train))

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        if self._train is None:
            raise _not_fitted(self.name)
        vectors, label = self._train
        similarity = self.embeddings(prompts).astype(np.float64) @ vectors.T
        top = np.maximum(similarity.max(axis=1, keepdims=True), 1e-6)
        # Exponent shifted by its row maximum (1): same ratios, no overflow for any base.
        weight = self.base ** (similarity / top - 1.0)
        cloud_win_rate = (weight @ label) / weight.sum(axis=1)
        score: np.ndarray = 1.0 - cloud_win_rate
        return score


@dataclass(frozen=True)
class FitSettings:
    """Minibatch AdamW on binary cross entropy against soft targets in [0, 1]."""

    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01


def _fit_binary(
    model: nn.Module, features: torch.Tensor, target: torch.Tensor, fit: FitSettings, seed: int
) -> None:
    optimiser = torch.optim.AdamW(model.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(fit.epochs):
        for batch in torch.randperm(len(target), generator=generator).split(fit.batch_size):
            loss = F.binary_cross_entropy_with_logits(model(features[batch]), target[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


class _EmbeddingClassifier(PairRouterBase):
    """Shared fit/predict of the two trained routers: a torch model from the pooled embedding
    to the logit of P(cloud better), trained on a soft target the subclass defines."""

    name: str

    def __init__(self, embeddings: PooledEmbeddings, fit: FitSettings, seed: int) -> None:
        self.embeddings, self.settings, self.seed = embeddings, fit, seed
        self.model: nn.Module | None = None

    @abc.abstractmethod
    def build(self) -> nn.Module:
        """A fresh, untrained model (built under the router's seed)."""

    @abc.abstractmethod
    def target(self, train: PairTable) -> np.ndarray:
        """The soft target P(cloud better) per training prompt."""

    def fit(self, train: PairTable) -> None:
        if len(train) == 0:
            raise ValueError("cannot fit on an empty table")
        features = torch.from_numpy(self.embeddings(train.prompts))
        target = torch.tensor(self.target(train), dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.build()
            _fit_binary(model, features, target, self.settings, self.seed)
        self.model = model

    @torch.no_grad()
    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        if self.model is None:
            raise _not_fitted(self.name)
        logit = self.model(torch.from_numpy(self.embeddings(prompts)))
        score: np.ndarray = torch.sigmoid(-logit).double().numpy()
        return score


class PairwiseMF(nn.Module):
    """RouteLLM's MFModel for two models: unit model vectors v_edge, v_cloud, a bias-free text
    projection W and a bias-free scorer w; output s(cloud, q) - s(edge, q)."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.models = nn.Embedding(2, dim)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.classifier = nn.Linear(dim, 1, bias=False)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        edge, cloud = F.normalize(self.models.weight, dim=-1)
        projected = self.text_proj(text)
        logit: torch.Tensor = self.classifier((cloud - edge) * projected)
        return logit.squeeze(-1)


class MatrixFactorisationRouter(_EmbeddingClassifier):
    """RouteLLM's matrix factorisation trained on the soft label "cloud better" (1, 0, 1/2)."""

    name = "matrix_factorisation"

    def __init__(
        self,
        embeddings: PooledEmbeddings,
        *,
        dim: int = 128,
        fit: FitSettings = FitSettings(epochs=40),
        seed: int = 0,
    ) -> None:
        super().__init__(embeddings, fit, seed)
        self.dim = dim

    def build(self) -> nn.Module:
        return PairwiseMF(self.embeddings.dim, self.dim)

    def target(self, train: PairTable) -> np.ndarray:
        return cloud_preference(train)


class RewardHead(nn.Module):
    """A one-hidden-layer MLP from the pooled embedding to one logit (ZOOTER's routing head)."""

    def __init__(self, text_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(text_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.net(text).squeeze(-1)
        return logit


class ZooterRouter(_EmbeddingClassifier):
    """Distils the normalised reward distribution: target P(cloud) = softmax over the two tiers
    of r / tau, i.e. sigmoid((r_cloud - r_edge) / (tau * s)), with s the training standard
    deviation of r_cloud - r_edge so that tau does not depend on the rating scale. Unlike the
    classifiers it keeps the size of the gap, not only its sign.
    """

    name = "zooter"

    def __init__(
        self,
        embeddings: PooledEmbeddings,
        *,
        temperature: float = 1.0,
        hidden: int = 128,
        dropout: float = 0.1,
        fit: FitSettings = FitSettings(epochs=30),
        seed: int = 0,
    ) -> None:
        super().__init__(embeddings, fit, seed)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.hidden, self.dropout = temperature, hidden, dropout

    def build(self) -> nn.Module:
        return RewardHead(self.embeddings.dim, self.hidden, self.dropout)

    def target(self, train: PairTable) -> np.ndarray:
        edge, cloud = scalar_quality(train)
        gap = cloud - edge
        scale = float(gap.std())
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        soft: np.ndarray = 1.0 / (1.0 + np.exp(-gap / (self.temperature * scale)))
        return soft
