"""RouteLLM's BERT classifier baseline: fine-tune the text encoder with a head that predicts
P(cloud better) from the [CLS] token (Ong et al., arXiv 2406.18665, Sec. 4).

It has to be refit for every fold of every pair on two CPU cores, so only the top encoder
layer is trained. The states entering that layer are frozen, computed once per prompt and
memoised in ``TopLayerInputs``; and because the head reads [CLS] alone, the top layer needs
keys and values for every token but queries and the feed-forward block for [CLS] only
(``ClsTopLayer``): the same [CLS] output as the full layer at about a sixth of its cost.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

from routing.data import cloud_preference
from routing.encoder import FrozenTextEncoder
from routing.types import PairRouterBase, PairTable

STATE_BATCH = 64


class TopLayerInputs:
    """Memo of the encoder states that enter its top layer, one (L_i, d) tensor per prompt.

    Share one instance between the routers of a cross-validation run: every prompt then goes
    through the frozen lower layers once, however many folds and pairs reuse it.
    """

    def __init__(self, encoder: FrozenTextEncoder) -> None:
        self.encoder = encoder
        self._memo: dict[str, torch.Tensor] = {}

    def top_layer(self) -> BertLayer:
        layer = getattr(getattr(self.encoder.model, "encoder", None), "layer", [None])[-1]
        if not isinstance(layer, BertLayer):
            raise TypeError(
                f"the BERT classifier needs a BERT-family encoder, got {type(self.encoder.model)}"
            )
        return layer

    def states(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded states (n, L, d) and mask (n, L) bool for ``prompts``."""
        missing = sorted({p for p in prompts if p not in self._memo}, key=len)
        for start in range(0, len(missing), STATE_BATCH):
            self._encode(missing[start : start + STATE_BATCH])
        rows = [self._memo[p] for p in prompts]
        longest = max((r.shape[0] for r in rows), default=0)
        out = torch.zeros(len(rows), longest, self.encoder.dim)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
        return out, mask

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> None:
        enc = self.encoder
        batch = enc.tokenizer(
            prompts, padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt"
        ).to(enc.device)
        hidden = enc.model(**batch, output_hidden_states=True).hidden_states[-2].float().cpu()
        real = batch["attention_mask"].bool().cpu()
        for i, prompt in enumerate(prompts):
            self._memo[prompt] = hidden[i][real[i]].clone()


class ClsTopLayer(nn.Module):
    """A trainable copy of a BERT layer that computes its output at position 0 ([CLS]) only.

    Self-attention for one query still attends over every unmasked token, and the residual
    and LayerNorm blocks are the copied layer's own modules, so in eval mode the result
    equals the full layer's output at [CLS] (tested).
    """

    def __init__(self, layer: BertLayer) -> None:
        super().__init__()
        self.layer: BertLayer = copy.deepcopy(layer)
        self.layer.requires_grad_(True)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attention = self.layer.attention.self
        heads, head_size = attention.num_attention_heads, attention.attention_head_size
        batch = states.shape[0]
        cls = states[:, :1]
        query = attention.query(cls).view(batch, 1, heads, head_size).transpose(1, 2)
        key = attention.key(states).view(batch, -1, heads, head_size).transpose(1, 2)
        value = attention.value(states).view(batch, -1, heads, head_size).transpose(1, 2)
        mixed = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask[:, None, None, :],
            dropout_p=attention.dropout.p if self.training else 0.0,
        )
        mixed = mixed.transpose(1, 2).reshape(batch, 1, heads * head_size)
        attended = self.layer.attention.output(mixed, cls)
        out: torch.Tensor = self.layer.output(self.layer.intermediate(attended), attended)
        return out[:, 0]


class BertClassifierRouter(PairRouterBase):
    """Fine-tuned top encoder layer plus a linear head on [CLS], trained with binary cross
    entropy on the soft label "cloud better" (1, 0, or 1/2 for a tie, as RouteLLM counts
    ties). The score is 1 - P(cloud better), so lower means cloud, like PRS.
    """

    name = "bert_classifier"

    def __init__(
        self,
        encoder: FrozenTextEncoder,
        *,
        inputs: TopLayerInputs | None = None,
        epochs: int = 4,
        batch_size: int = 16,
        layer_lr: float = 1e-4,
        head_lr: float = 2e-3,
        weight_decay: float = 0.01,
        dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.inputs = inputs if inputs is not None else TopLayerInputs(encoder)
        if self.inputs.encoder is not encoder:
            raise ValueError("inputs must memoise the same encoder the router uses")
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.layer_lr, self.head_lr, self.weight_decay = layer_lr, head_lr, weight_decay
        self.dropout = dropout
        self._fitted: tuple[ClsTopLayer, nn.Module] | None = None

    def fit(self, train: PairTable) -> None:
        states, mask = self.inputs.states(train.prompts)
        target = torch.tensor(cloud_preference(train), dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            layer = ClsTopLayer(self.inputs.top_layer())
            head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.inputs.encoder.dim, 1))
            self._train(layer, head, states, mask, target)
        self._fitted = (layer.eval(), head.eval())

    def _train(
        self,
        layer: ClsTopLayer,
        head: nn.Module,
        states: torch.Tensor,
        mask: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        optimiser = torch.optim.AdamW(
            [
                {"params": layer.parameters(), "lr": self.layer_lr},
                {"params": head.parameters(), "lr": self.head_lr},
            ],
            weight_decay=self.weight_decay,
        )
        steps = self.epochs * math.ceil(len(target) / self.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
        layer.train()
        head.train()
        for _ in range(self.epochs):
            for batch in torch.randperm(len(target)).split(self.batch_size):
                longest = int(mask[batch].sum(1).max())
                cls = layer(states[batch, :longest], mask[batch, :longest])
                logit = head(cls).squeeze(-1)
                loss = F.binary_cross_entropy_with_logits(logit, target[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()

    @torch.no_grad()
    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        if self._fitted is None:
            raise RuntimeError(f"{self.name} is not fitted; call fit() first")
        if not prompts:
            return np.zeros(0, dtype=np.float64)
        layer, head = self._fitted
        states, mask = self.inputs.states(prompts)
        logit = head(layer(states, mask)).squeeze(-1)
        score: np.ndarray = torch.sigmoid(-logit).double().numpy()
        return score
