"""The RouteT2I router (Niu et al., arXiv 2411.13787, Sec. 3.3): a dual-gated token-selection
mixture of experts, one expert per quality metric, over the token states of a frozen text
encoder. It predicts the normalised distance D_i of every metric and their weighted sum, the
Pareto relative superiority (PRS) of the edge image over the cloud image.

On a pool of tiers the experts stay one per metric and the heads multiply: one set per
non-reference tier, each predicting D_i and PRS of the reference tier (tier 0, the cheapest)
against that tier. With two tiers there is one set of heads, the paper's router, with the same
parameters, initialisation and training as before the pool existed."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from routing.encoder import FrozenTextEncoder, default_encoder_path
from routing.policy import pair_scores
from routing.prs import PRSParams, check_weights
from routing.types import (
    PAIR_TIERS,
    PairRouterBase,
    PairTable,
    PoolRouterBase,
    PoolTable,
    TierQuality,
    as_pool,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREDICT_BATCH = 256


@dataclass(frozen=True)
class RouteT2IConfig:
    """Everything that defines a router version except its learned weights.

    ``n_metrics`` and ``hidden`` are overwritten at fit time from the data and the encoder.
    The three switches are the paper's ablations: ``multi_metric`` (one expert per metric, or
    one expert predicting PRS directly), ``token_selection`` (gate plus top-K, or a plain mean
    over all tokens) and ``dual_gate`` (positive and negative projections contrasted, or one).

    The training defaults are tuned for a few hundred noisy pairs (GenAI-Bench, one human
    rating per image; bench/routet2i_sanity.py, bench/routet2i_tuning.py on development pairs
    and seeds only): longer training or a wider top-K overfit on held-out folds, and a small
    seed ensemble steadies the ranking. ``rank_loss`` (a pairwise logistic loss on the
    predicted PRS, added to the BCE) and ``shared_expert`` (a linear read-out of the
    mean-pooled token states added to every expert) are options that did not help there.
    ``encoder_layer`` -3 reads MiniLM's fourth of six layers: on the development seeds its
    token states ranked better than the last layer's (Delta P@50% +3 to +9 points), which is
    tuned towards whole-sentence similarity rather than the words that make a prompt hard.
    """

    n_metrics: int = 10
    hidden: int = 384
    rank: int = 16
    score_dim: int = 16
    top_k: int = 4
    dropout: float = 0.1
    gamma: float = 1.0
    weights: tuple[float, ...] | None = None
    multi_metric: bool = True
    token_selection: bool = True
    dual_gate: bool = True
    encoder: str | None = None
    encoder_revision: str | None = None
    encoder_layer: int = -3
    max_length: int = 77
    lr: float = 3e-3
    epochs: int = 6
    batch_size: int = 32
    weight_decay: float = 0.05
    ensemble: int = 3
    rank_loss: float = 0.0
    shared_expert: bool = False
    seed: int = 0
    verbose: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["weights"] = None if self.weights is None else list(self.weights)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown RouteT2I config fields: {sorted(unknown)}")
        values = dict(data)
        if values.get("weights") is not None:
            values["weights"] = tuple(float(w) for w in values["weights"])
        return cls(**values)


class RouteT2IModel(nn.Module):
    """Frozen token states (n, L, d) and mask (n, L) -> logits of D_i (n, targets * experts),
    one block of experts per non-reference tier (``n_targets``, 1 for a pair)."""

    prs_weights: torch.Tensor

    def __init__(
        self, config: RouteT2IConfig, prs_weights: Sequence[float], n_targets: int = 1
    ) -> None:
        super().__init__()
        if n_targets < 1:
            raise ValueError(f"n_targets must be at least 1, got {n_targets}")
        d, rank, h = config.hidden, config.rank, config.score_dim
        self.config = config
        self.n_targets = n_targets
        self.n_experts = config.n_metrics if config.multi_metric else 1
        e, branches = self.n_experts, 2 if config.dual_gate else 1
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)
        self.expert_embeddings = (
            nn.Parameter(torch.randn(e, d) / math.sqrt(d)) if config.token_selection else None
        )
        self.projections = nn.Parameter(torch.randn(branches, e, d, rank) / math.sqrt(d))
        self.scoring = nn.Parameter(torch.randn(e, rank, h) / math.sqrt(rank))
        # One head per (target tier, expert), flat so a pair keeps the (e, h) shape of saved
        # versions and draws the same initial values.
        self.head_weight = nn.Parameter(torch.randn(n_targets * e, h) / math.sqrt(h))
        self.head_bias = nn.Parameter(torch.zeros(n_targets * e))
        # Optional shared expert: a linear read-out of the mean-pooled token states added to
        # every gated expert's logit (a residual path that sees the whole prompt).
        self.shared = nn.Linear(d, n_targets * e) if config.shared_expert else None
        if self.shared is not None:
            nn.init.zeros_(self.shared.weight)
            nn.init.zeros_(self.shared.bias)
        weights = check_weights(tuple(prs_weights), config.n_metrics)
        self.register_buffer("prs_weights", torch.tensor(weights, dtype=torch.float32))

    def select_tokens(
        self, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices (n, e, K) and their pooling weights (n, e, K), zero on padding.

        Gate A = softmax(T E^T) over the real tokens of each prompt, per expert; the top-K
        tokens keep their gate values renormalised to sum to one (Sec. 3.3). Without token
        selection every real token is kept with equal weight.
        """
        n, length, d = states.shape
        if self.expert_embeddings is None:
            index = torch.arange(length, device=states.device).expand(n, self.n_experts, length)
            real = mask.unsqueeze(1).expand(n, self.n_experts, length).to(states.dtype)
            return index, real / real.sum(-1, keepdim=True).clamp_min(1.0)
        # Scaled like attention logits so the gate is not saturated at initialisation.
        logits = torch.einsum("nld,ed->nel", states, self.expert_embeddings) / math.sqrt(d)
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        gate = torch.softmax(logits, dim=-1)
        top, index = gate.topk(min(self.config.top_k, length), dim=-1)
        top = top * mask.unsqueeze(1).expand_as(gate).gather(-1, index)
        return index, top / top.sum(-1, keepdim=True).clamp_min(1e-12)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = self.dropout(self.norm(states))
        index, weights = self.select_tokens(states, mask)
        n, e, k = index.shape
        tokens = states.unsqueeze(1).expand(n, e, *states.shape[1:])
        tokens = tokens.gather(2, index.unsqueeze(-1).expand(n, e, k, states.shape[-1]))
        # Sec. 3.3 contrasts a positive and a negative branch through a shared scorer S_i; the
        # paper leaves the branch activation open, and without one T+ - T- collapses to a single
        # linear map, so each low-rank projection goes through a GELU before S_i.
        low_rank = F.gelu(torch.einsum("nekd,bedr->bnekr", tokens, self.projections))
        scores = torch.einsum("bnekr,erh->bnekh", low_rank, self.scoring)
        contrast = torch.sigmoid(scores[0] - scores[1] if self.config.dual_gate else scores[0])
        pooled = self.dropout(torch.einsum("nekh,nek->neh", contrast, weights))
        heads = self.head_weight.view(self.n_targets, e, -1)
        logits: torch.Tensor = (pooled.unsqueeze(1) * heads).sum(-1).reshape(n, -1)
        logits = logits + self.head_bias
        if self.shared is not None:
            real = mask.unsqueeze(-1).to(states.dtype)
            mean = (states * real).sum(1) / real.sum(1).clamp_min(1.0)
            logits = logits + self.shared(mean)
        return logits

    def prs(self, logits: torch.Tensor) -> torch.Tensor:
        """PRS = sum_i w_i D_i per target tier (n, targets), or the single expert's output
        when it predicts PRS directly."""
        return prs_of(
            torch.sigmoid(logits), self.config.multi_metric, self.prs_weights, self.n_targets
        )


def prs_of(
    distance: torch.Tensor, multi_metric: bool, weights: torch.Tensor, n_targets: int = 1
) -> torch.Tensor:
    """Predicted D (n, targets * experts) -> PRS (n, targets)."""
    n = distance.shape[0]
    per_target = distance.reshape(n * n_targets, distance.shape[1] // n_targets)
    prs = (per_target @ weights).clamp(0.0, 1.0) if multi_metric else per_target[:, 0]
    return prs.reshape(n, n_targets)


def pairwise_rank_loss(prs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logistic loss on every ordered pair of the batch whose target PRS differ: the routing
    policy only reads the order of the predicted PRS, so the order is what this trains."""
    score = torch.logit(prs.clamp(1e-4, 1 - 1e-4))
    gap = target.unsqueeze(1) - target.unsqueeze(0)
    ordered = (gap > 1e-6).to(score.dtype)
    if ordered.sum() == 0:
        return score.sum() * 0.0
    margin = score.unsqueeze(1) - score.unsqueeze(0)
    return (F.softplus(-margin) * ordered).sum() / ordered.sum()


class RouteT2IEnsemble(nn.Module):
    """Members trained from different seeds; the predicted D_i is their mean.

    With a few hundred noisy labels a single member's ranking depends on its initialisation
    and batch order; averaging a few members removes most of that variance at a linear cost.
    """

    def __init__(
        self, config: RouteT2IConfig, prs_weights: Sequence[float], n_targets: int = 1
    ) -> None:
        super().__init__()
        if config.ensemble < 1:
            raise ValueError(f"ensemble must be at least 1, got {config.ensemble}")
        self.config = config
        self.n_targets = n_targets
        self.members = nn.ModuleList(
            RouteT2IModel(config, prs_weights, n_targets) for _ in range(config.ensemble)
        )

    def models(self) -> list[RouteT2IModel]:
        return [m for m in self.members if isinstance(m, RouteT2IModel)]

    def distance(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted D_i (n, targets * experts): the members' mean."""
        return torch.stack([torch.sigmoid(m(states, mask)) for m in self.models()]).mean(0)

    def prs(self, distance: torch.Tensor) -> torch.Tensor:
        """PRS per target tier (n, targets)."""
        weights = self.models()[0].prs_weights
        return prs_of(distance, self.config.multi_metric, weights, self.n_targets)


@functools.cache
def shared_encoder(
    path: str | None, revision: str | None, max_length: int, layer: int = -1
) -> FrozenTextEncoder:
    """One encoder (and one prompt memo) per process for each configuration, so many routers
    (folds, pairs, versions) do not each load the weights and re-encode the same prompts."""
    return FrozenTextEncoder(path, max_length=max_length, revision=revision, layer=layer)


def _batches(n: int, size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(size)


class RouteT2IRouter(PairRouterBase, PoolRouterBase):
    """The RouteT2I method behind the ``PersistentRouter`` interface (a pair: ``predict_prs``)
    and the ``PoolRouter`` one (any pool: ``predict_quality``, the superiority of each tier
    over the reference tier)."""

    kind = "routet2i"

    def __init__(
        self,
        config: RouteT2IConfig | None = None,
        encoder: FrozenTextEncoder | None = None,
        **overrides: Any,
    ) -> None:
        self.config = dataclasses.replace(config or RouteT2IConfig(), **overrides)
        if encoder is not None and self.config.encoder is None:
            # Record a non-default encoder so that load() finds the same one again.
            same = Path(encoder.path).resolve() == default_encoder_path().resolve()
            self.config = dataclasses.replace(self.config, encoder=None if same else encoder.path)
        if encoder is not None:
            # The layer actually read is part of the version, whatever the defaults say.
            self.config = dataclasses.replace(self.config, encoder_layer=encoder.layer)
        self._encoder = encoder
        self.model: RouteT2IEnsemble | None = None
        # Label parameters of the reference tier against each other tier, in tier order.
        self.tier_params: tuple[PRSParams, ...] = ()
        self.tiers: tuple[str, ...] = PAIR_TIERS
        self.metrics: tuple[str, ...] = ()

    @property
    def prs_params(self) -> PRSParams | None:
        """The label parameters of a pair router (None before fitting)."""
        if len(self.tier_params) > 1:
            raise ValueError(f"{self.name} routes a pool of {len(self.tiers)} tiers, not a pair")
        return self.tier_params[0] if self.tier_params else None

    @property
    def name(self) -> str:
        off = [
            label
            for label, on in (
                ("multi-metric", self.config.multi_metric),
                ("token-selection", self.config.token_selection),
                ("dual-gate", self.config.dual_gate),
            )
            if not on
        ]
        return "-no-".join(("routet2i", *off))

    @property
    def encoder(self) -> FrozenTextEncoder:
        if self._encoder is None:
            c = self.config
            self._encoder = shared_encoder(
                c.encoder, c.encoder_revision, c.max_length, c.encoder_layer
            )
        return self._encoder

    def fit(self, train: PairTable | PoolTable) -> None:
        """Train on ``train``: labels D_i and PRS of the reference tier against every other
        tier, each pair under its own tier means on ``train``."""
        if len(train) == 0:
            raise ValueError("cannot fit on an empty table")
        pool = as_pool(train)
        reference = pool.tiers[0]
        pairs = (
            [train]
            if isinstance(train, PairTable)
            else [pool.pair(reference, tier) for tier in pool.tiers[1:]]
        )
        c = self.config
        all_params = tuple(PRSParams.fit(p, gamma=c.gamma, weights=c.weights) for p in pairs)
        labels = [params.labels(p) for params, p in zip(all_params, pairs, strict=True)]
        config = dataclasses.replace(
            self.config, n_metrics=len(train.metrics), hidden=self.encoder.dim
        )
        states, mask = self.encoder.token_states(train.prompts)
        targets = torch.tensor(np.concatenate([d for d, _ in labels], axis=1), dtype=torch.float32)
        target_prs_t = torch.tensor(np.stack([p for _, p in labels], axis=1), dtype=torch.float32)
        n_targets = len(pairs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = RouteT2IEnsemble(config, all_params[0].weights, n_targets)
            epochs = self._progress(range(config.epochs * config.ensemble))
            for number, member in enumerate(model.models()):
                generator = torch.Generator().manual_seed(config.seed * 7919 + number)
                for _ in self._train(member, states, mask, targets, target_prs_t, generator):
                    next(epochs, None)
        self.config, self.model, self.tier_params = config, model.eval(), all_params
        self.tiers, self.metrics = pool.tiers, train.metrics

    @staticmethod
    def _train(
        model: RouteT2IModel,
        states: torch.Tensor,
        mask: torch.Tensor,
        targets: torch.Tensor,
        target_prs: torch.Tensor,
        generator: torch.Generator,
    ) -> Iterator[float]:
        """AdamW with a cosine schedule; yields the mean training loss after every epoch.
        ``targets`` are D (n, targets * experts), ``target_prs`` PRS (n, targets)."""
        c = model.config
        optimiser = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        steps = c.epochs * math.ceil(len(states) / c.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
        model.train()
        for _ in range(c.epochs):
            total = 0.0
            for batch in _batches(len(states), c.batch_size, generator):
                logits = model(states[batch], mask[batch])
                loss = F.binary_cross_entropy(
                    model.prs(logits).clamp(1e-6, 1 - 1e-6), target_prs[batch]
                )
                if c.multi_metric:
                    loss = loss + F.binary_cross_entropy_with_logits(logits, targets[batch])
                if c.rank_loss > 0:
                    prs, target = model.prs(logits), target_prs[batch]
                    rank = sum(
                        pairwise_rank_loss(prs[:, t], target[:, t]) for t in range(prs.shape[1])
                    )
                    loss = loss + c.rank_loss * rank / prs.shape[1]
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(batch)
            yield total / len(states)
        model.eval()

    def _progress(self, epochs: range) -> Iterator[int]:
        if not self.config.verbose:
            return iter(epochs)
        from rich.progress import track

        return iter(track(epochs, description=f"training {self.name}"))

    def _fitted(self) -> RouteT2IEnsemble:
        if self.model is None:
            raise RuntimeError(f"{self.name} is not fitted; call fit() or load() first")
        return self.model

    @torch.no_grad()
    def _distance(self, prompts: Sequence[str]) -> torch.Tensor:
        model = self._fitted()
        chunks = []
        for start in range(0, len(prompts), PREDICT_BATCH):
            states, mask = self.encoder.token_states(prompts[start : start + PREDICT_BATCH])
            chunks.append(model.distance(states, mask))
        experts = self.config.n_metrics if self.config.multi_metric else 1
        return torch.cat(chunks) if chunks else torch.zeros(0, model.n_targets * experts)

    def predict_tiers(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted PRS of the reference tier against every other tier (n, tiers - 1) and
        D_i (n, tiers - 1, m), from one forward pass."""
        distance = self._distance(prompts)
        prs: np.ndarray = self._fitted().prs(distance).numpy().astype(np.float64)
        experts = distance.shape[1] // prs.shape[1]
        per_tier = distance.numpy().astype(np.float64).reshape(len(prompts), prs.shape[1], experts)
        return prs, per_tier

    def predict_quality(self, prompts: Sequence[str]) -> np.ndarray:
        """The superiority of each tier over the reference tier (n, tiers): 1/2 for the
        reference itself, 1 - PRS for the others (PRS > 1/2: the reference is better). With
        two tiers the policy's cloud-if-(1 - PRS) - lambda * dc > 1/2 is PRS < alpha."""
        prs = self.predict_tiers(prompts)[0]
        return np.concatenate([np.full((len(prs), 1), 0.5), 1.0 - prs], axis=1)

    def predict_with_metrics(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted PRS (n,) and D_i (n, m) of a pair router from one forward pass; with
        ``multi_metric`` off the single column of D is the PRS itself."""
        if len(self.tiers) != 2:
            raise ValueError(f"{self.name} routes a pool of {len(self.tiers)} tiers, not a pair")
        prs, distance = self.predict_tiers(prompts)
        return prs[:, 0], distance[:, 0]

    def predict_tier_quality(self, prompts: Sequence[str], tiers: Sequence[str]) -> TierQuality:
        """On a pair of tiers, the pair router's scores with its D_i from the same forward pass;
        on a pool, ``predict_quality`` over the tiers it was fitted on."""
        if len(tiers) != 2:
            return TierQuality(self.tiers, self.predict_quality(prompts))
        prs, distance = self.predict_with_metrics(prompts)
        return TierQuality(tuple(tiers), pair_scores(prs, 2), distance)

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted PRS in (0, 1) per prompt: below 1/2 the cloud image is expected better."""
        return self.predict_with_metrics(prompts)[0]

    def predict_metrics(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted D_i per prompt, (n, m)."""
        return self.predict_with_metrics(prompts)[1]

    def _document(self) -> dict[str, Any]:
        if not self.tier_params:
            raise RuntimeError(f"{self.name} is not fitted; call fit() or load() first")
        document: dict[str, Any] = {"config": self.config.to_dict(), "metrics": list(self.metrics)}
        if self.tiers == PAIR_TIERS:
            # A pair router's document (and so its version) is what it was before pools.
            document["prs"] = self.tier_params[0].to_dict()
        else:
            document["prs"] = [params.to_dict() for params in self.tier_params]
            document["tiers"] = list(self.tiers)
        return document

    @property
    def version(self) -> str:
        """Content hash of config, labels' parameters and weights: equal models, equal version."""
        digest = hashlib.sha256(json.dumps(self._document(), sort_keys=True).encode())
        for key, tensor in sorted(self._fitted().state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"{self.name}-{digest.hexdigest()[:16]}"

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self._fitted().state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self._document(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path, encoder: FrozenTextEncoder | None = None) -> Self:
        document = json.loads((Path(path) / CONFIG_FILE).read_text())
        config = RouteT2IConfig.from_dict(document["config"])
        if encoder is not None and encoder.layer != config.encoder_layer:
            raise ValueError(
                f"the router was trained on encoder layer {config.encoder_layer}, "
                f"the given encoder reads layer {encoder.layer}"
            )
        router = cls(config, encoder)
        prs = document["prs"]
        router.tier_params = tuple(
            PRSParams.from_dict(p) for p in (prs if isinstance(prs, list) else [prs])
        )
        router.tiers = tuple(document.get("tiers", PAIR_TIERS))
        router.metrics = tuple(document["metrics"])
        model = RouteT2IEnsemble(
            router.config, router.tier_params[0].weights, len(router.tier_params)
        )
        model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))
        router.model = model.eval()
        return router
