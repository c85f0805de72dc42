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

All of them see the scalar quality (``routing.data.pool_scalar_quality``). The ones a worker
could serve (prompt length, kNN, ridge, TF-IDF ridge, matrix factorisation) save their fitted
state as a JSON config beside a safetensors file of arrays, and record the tiers they score and
the encoder they read; the random router and the oracle are evaluation only.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from safetensors.numpy import load_file, save_file

from routing.baselines import WORD
from routing.data import pool_scalar_quality
from routing.embedding_baselines import FitSettings, PooledEmbeddings
from routing.encoder import default_encoder_path
from routing.types import PoolRouterBase, PoolTable

if TYPE_CHECKING:
    from routing.mf_model import PoolMF

CONFIG_FILE = "config.json"
ARRAYS_FILE = "arrays.safetensors"


def _not_fitted(name: str) -> RuntimeError:
    return RuntimeError(f"{name} is not fitted; call fit() first")


class _SavedPoolRouter(PoolRouterBase):
    """Save and load as ``config.json`` (settings, tiers) and ``arrays.safetensors`` (the
    fitted arrays): a loaded router predicts what the saved one did, exactly but for the last
    bits of a prompt embedding, which depend on the batch the prompt was encoded in."""

    name: str
    tiers: tuple[str, ...] = ()

    @abc.abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The settings (JSON) and fitted arrays that ``_restore`` rebuilds the router from."""

    @classmethod
    @abc.abstractmethod
    def _restore(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        """The router that ``_state`` described."""

    def save(self, path: Path) -> None:
        config, arrays = self._state()
        path.mkdir(parents=True, exist_ok=True)
        document = {**config, "tiers": list(self.tiers)}
        (path / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path / ARRAYS_FILE))

    @classmethod
    def load(cls, path: Path) -> Self:
        config = json.loads((path / CONFIG_FILE).read_text())
        tiers = tuple(config.pop("tiers"))
        router = cls._restore(config, load_file(str(path / ARRAYS_FILE)))
        router.tiers = tiers
        return router


def _encoder_spec(embeddings: PooledEmbeddings) -> dict[str, Any]:
    """What loads the same encoder again; the shipped MiniLM is recorded as None, so that an
    artefact does not name one installation's site-packages."""
    encoder = embeddings.encoder
    default = Path(encoder.path).resolve() == default_encoder_path().resolve()
    return {
        "path": None if default else encoder.path,
        "revision": encoder.revision,
        "max_length": encoder.max_length,
        "layer": encoder.layer,
    }


def _embeddings(spec: Mapping[str, Any]) -> PooledEmbeddings:
    from routing.routet2i import shared_encoder

    encoder = shared_encoder(spec["path"], spec["revision"], spec["max_length"], spec["layer"])
    return PooledEmbeddings(encoder)


def _uniform(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class RandomPoolRouter(PoolRouterBase):
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


class PromptLengthPoolRouter(_SavedPoolRouter):
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
        self.tiers = train.tiers

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._coef is None:
            raise _not_fitted(self.name)
        result: np.ndarray = self._design(prompts) @ self._coef
        return result

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self._coef is None:
            raise _not_fitted(self.name)
        return {}, {"coef": self._coef}

    @classmethod
    def _restore(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        router = cls()
        router._coef = arrays["coef"]
        return router


class KnnQualityRouter(_SavedPoolRouter):
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
        self.tiers = train.tiers

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

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self._train is None:
            raise _not_fitted(self.name)
        vectors, quality = self._train
        config = {"k": self.k, "base": self.base, "encoder": _encoder_spec(self.embeddings)}
        return config, {"vectors": vectors, "quality": quality}

    @classmethod
    def _restore(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        router = cls(_embeddings(config["encoder"]), k=config["k"], base=config["base"])
        router._train = (arrays["vectors"], arrays["quality"])
        return router


def _ridge(features: np.ndarray, target: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (d, t) and intercepts (t,) of ridge regression with an unpenalised
    intercept, every target column in one solve."""
    x_mean, y_mean = features.mean(axis=0), target.mean(axis=0)
    x, y = features - x_mean, target - y_mean
    gram = x.T @ x + alpha * np.eye(x.shape[1])
    coef = np.linalg.solve(gram, x.T @ y)
    intercept: np.ndarray = y_mean - x_mean @ coef
    return coef, intercept


class RidgeQualityRouter(_SavedPoolRouter):
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
        self.tiers = train.tiers

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._fitted is None:
            raise _not_fitted(self.name)
        coef, intercept = self._fitted
        result: np.ndarray = self.embeddings(prompts).astype(np.float64) @ coef + intercept
        return result

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self._fitted is None:
            raise _not_fitted(self.name)
        coef, intercept = self._fitted
        config = {"alpha": self.alpha, "encoder": _encoder_spec(self.embeddings)}
        return config, {"coef": coef, "intercept": intercept}

    @classmethod
    def _restore(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        router = cls(_embeddings(config["encoder"]), alpha=config["alpha"])
        router._fitted = (arrays["coef"], arrays["intercept"])
        return router


class TfidfRidgeRouter(_SavedPoolRouter):
    """Ridge regression of each tier's quality on TF-IDF features of words and bigrams
    (scikit-learn; sublinear term frequency, the vocabulary fitted on the training prompts).
    It keeps the vectoriser and the regression's coefficients, which is all a prediction
    reads (scikit-learn's own ``X @ coef_.T + intercept_``) and all a saved version holds."""

    name = "tfidf_ridge"

    def __init__(self, *, alpha: float = 1.0) -> None:
        self.alpha = alpha
        self._fitted: tuple[Any, np.ndarray, np.ndarray] | None = None

    @staticmethod
    def _vectoriser(vocabulary: Sequence[str] | None = None) -> Any:
        from sklearn.feature_extraction.text import TfidfVectorizer

        fixed = None if vocabulary is None else {term: i for i, term in enumerate(vocabulary)}
        return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, vocabulary=fixed)

    def fit(self, train: PoolTable) -> None:
        from sklearn.linear_model import Ridge

        vectoriser = self._vectoriser()
        features = vectoriser.fit_transform(train.prompts)
        model = Ridge(alpha=self.alpha).fit(features, pool_scalar_quality(train))
        self._fitted = (vectoriser, model.coef_, model.intercept_)
        self.tiers = train.tiers

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        if self._fitted is None:
            raise _not_fitted(self.name)
        vectoriser, coef, intercept = self._fitted
        features = vectoriser.transform(list(prompts))
        result = np.asarray(features @ coef.T + intercept, dtype=np.float64)
        return result.reshape(len(prompts), -1)

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self._fitted is None:
            raise _not_fitted(self.name)
        vectoriser, coef, intercept = self._fitted
        vocabulary = sorted(vectoriser.vocabulary_, key=vectoriser.vocabulary_.get)
        arrays = {"idf": vectoriser.idf_, "coef": coef, "intercept": intercept}
        return {"alpha": self.alpha, "vocabulary": vocabulary}, arrays

    @classmethod
    def _restore(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        router = cls(alpha=config["alpha"])
        vectoriser = cls._vectoriser(config["vocabulary"])
        vectoriser.idf_ = arrays["idf"]
        router._fitted = (vectoriser, arrays["coef"], arrays["intercept"])
        return router


class MatrixFactorisationPoolRouter(_SavedPoolRouter):
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
        self._model: PoolMF | None = None

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
        self.tiers = train.tiers

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        import torch

        if self._model is None:
            raise _not_fitted(self.name)
        with torch.no_grad():
            score = self._model(torch.from_numpy(self.embeddings(prompts)))
        result: np.ndarray = score.double().numpy()
        return result

    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self._model is None:
            raise _not_fitted(self.name)
        config = {
            "dim": self.dim,
            "fit": dataclasses.asdict(self.settings),
            "seed": self.seed,
            "encoder": _encoder_spec(self.embeddings),
            "text_dim": self._model.text_proj.in_features,
            "n_models": self._model.models.num_embeddings,
        }
        weights = {k: v.detach().cpu().numpy() for k, v in self._model.state_dict().items()}
        return config, weights

    @classmethod
    def _restore(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        import torch

        from routing.mf_model import PoolMF

        router = cls(
            _embeddings(config["encoder"]),
            dim=config["dim"],
            fit=FitSettings(**config["fit"]),
            seed=config["seed"],
        )
        model = PoolMF(config["text_dim"], config["n_models"], config["dim"])
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
        router._model = model.eval()
        return router


class OraclePoolRouter(PoolRouterBase):
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
