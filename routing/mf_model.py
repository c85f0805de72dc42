"""The matrix-factorisation network of RouteLLM (``routellm/routers/matrix_factorization/
model.py``), generalised from a pair to N models: a score per (prompt, model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PoolMF(nn.Module):
    """``s(m, q) = w^T (v_m * W q) + b_m``: unit model vectors v_m, a bias-free text projection
    W, a bias-free scorer w and a bias per model; output (n, models)."""

    def __init__(self, text_dim: int, n_models: int, dim: int) -> None:
        super().__init__()
        self.models = nn.Embedding(n_models, dim)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.classifier = nn.Linear(dim, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(n_models))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        models = F.normalize(self.models.weight, dim=-1)
        projected = self.text_proj(text)
        score: torch.Tensor = self.classifier(projected[:, None, :] * models[None]).squeeze(-1)
        return score + self.bias
