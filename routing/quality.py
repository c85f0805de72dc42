"""Contrastive image quality on the ten metrics (RouteT2I, Sec. 3.1), from a CLIP model.

``q(I, m) = sigmoid(CLIP(I, m+) - CLIP(I, m-))`` with CLIP the image-text cosine similarity
scaled by CLIP's learned temperature, ``logit_scale.exp()``: the same logits CLIP's own
zero-shot classifier feeds to a softmax, so over a two-text pair the score is exactly CLIP's
probability that the positive text describes the image better than the negative one.

Computed with transformers' ``CLIPModel`` directly (torchmetrics' CLIPScore breaks under
transformers 5, see DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor
from transformers.utils import ModelOutput

from routing.metrics import METRICS, METRICS_VERSION, Metric


class ContrastiveQualityScorer:
    """Scores images on every metric of a metrics table with one CLIP forward per batch.

    The 2 x n_metrics texts never change, so their normalised embeddings are computed once,
    here; each call to ``score`` runs only the vision tower, once for the whole batch.
    A custom metrics table must come with its own ``metrics_version``: stored scores are
    only comparable under the same texts.
    """

    def __init__(
        self,
        model: CLIPModel,
        processor: CLIPProcessor,
        metrics: Sequence[Metric] = METRICS,
        device: str = "cpu",
        *,
        metrics_version: str = METRICS_VERSION,
    ) -> None:
        if not metrics:
            raise ValueError("at least one metric is needed")
        # transformers types its wrapper of Module.to as if it took the model again.
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.processor = processor
        self.metrics: tuple[Metric, ...] = tuple(metrics)
        self.metrics_version = metrics_version
        self.device = torch.device(device)
        self._text_embeds = self._embed_texts(
            [m.positive for m in self.metrics] + [m.negative for m in self.metrics]
        )

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Quality of each image on each metric: shape (n_images, n_metrics), values in (0, 1)."""
        n_metrics = len(self.metrics)
        if not images:
            return np.empty((0, n_metrics), dtype=np.float64)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(
            pixel_values=pixels.to(self.device, dtype=self.model.dtype)
        )
        image_embeds = _normalise(_projected(features))
        logits = self.model.logit_scale.exp() * image_embeds @ self._text_embeds.T
        # Columns hold all positive texts, then all negative texts, in metric order.
        contrast = logits[:, :n_metrics] - logits[:, n_metrics:]
        return torch.sigmoid(contrast.double()).cpu().numpy()

    @torch.inference_mode()
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return _normalise(_projected(features))


def _projected(features: torch.Tensor | ModelOutput) -> torch.Tensor:
    """The projected embeddings from ``get_*_features``: transformers 4 returns them as a
    tensor, transformers 5 as the ``pooler_output`` of a model output."""
    if isinstance(features, torch.Tensor):
        return features
    pooled = getattr(features, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"{type(features).__name__} carries no pooler_output tensor")
    return pooled


def _normalise(embeds: torch.Tensor) -> torch.Tensor:
    return embeds / embeds.norm(dim=-1, keepdim=True)
