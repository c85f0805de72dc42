"""Contrastive quality scores against the formula, computed from CLIP's own outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from routing.metrics import METRIC_NAMES, METRICS, METRICS_VERSION, Metric
from routing.quality import ContrastiveQualityScorer
from workers.services.pipelines import load_clip


@pytest.fixture(scope="module")
def scorer(tiny_models: dict[str, Path]) -> ContrastiveQualityScorer:
    model, processor = load_clip(str(tiny_models["clip"]))
    return ContrastiveQualityScorer(model, processor)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Noise, a gradient, a flat colour and a non-square image: inputs CLIP tells apart."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    gradient = np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1)
    return [
        Image.fromarray(noise),
        Image.fromarray(gradient),
        Image.new("RGB", (64, 64), (200, 30, 30)),
        Image.fromarray(rng.integers(0, 256, size=(48, 96, 3), dtype=np.uint8)),
    ]


def test_shape_and_range(scorer: ContrastiveQualityScorer, images: list[Image.Image]) -> None:
    scores = scorer.score(images)
    assert scores.shape == (len(images), len(METRICS))
    assert np.all((scores > 0) & (scores < 1))
    assert len(np.unique(scores.round(6), axis=0)) == len(images)


def test_carries_the_metrics_table_and_version(scorer: ContrastiveQualityScorer) -> None:
    assert scorer.metric_names == METRIC_NAMES
    assert scorer.metrics_version == METRICS_VERSION


def test_deterministic(
    scorer: ContrastiveQualityScorer, images: list[Image.Image], tiny_models: dict[str, Path]
) -> None:
    model, processor = load_clip(str(tiny_models["clip"]))
    fresh = ContrastiveQualityScorer(model, processor)
    first = scorer.score(images)
    assert np.array_equal(first, scorer.score(images))
    assert np.array_equal(first, fresh.score(images))


def test_batch_equals_one_by_one(
    scorer: ContrastiveQualityScorer, images: list[Image.Image]
) -> None:
    batch = scorer.score(images)
    single = np.concatenate([scorer.score([image]) for image in images])
    np.testing.assert_allclose(batch, single, rtol=0, atol=1e-6)


def test_equals_the_formula_on_raw_clip_outputs(
    scorer: ContrastiveQualityScorer, images: list[Image.Image]
) -> None:
    """q(I, m) = sigmoid(CLIP(I, m+) - CLIP(I, m-)), CLIP's scaled cosine logits per pair."""
    image = images[1]
    scores = scorer.score([image])[0]
    for index, metric in enumerate(METRICS):
        inputs = scorer.processor(
            text=[metric.positive, metric.negative],
            images=[image],
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = scorer.model(**inputs).logits_per_image[0].double()
        expected = 1 / (1 + math.exp(-(logits[0] - logits[1]).item()))
        assert scores[index] == pytest.approx(expected, rel=1e-5), metric.name


def test_custom_table(scorer: ContrastiveQualityScorer, images: list[Image.Image]) -> None:
    table = (Metric("brightness", "Bright photo.", "Dark photo."), METRICS[0])
    custom = ContrastiveQualityScorer(
        scorer.model, scorer.processor, table, metrics_version="test-1"
    )
    scores = custom.score(images)
    assert scores.shape == (len(images), 2)
    np.testing.assert_allclose(scores[:, 1], scorer.score(images)[:, 0], atol=1e-6)
    assert custom.metrics_version == "test-1"


def test_no_images_no_scores(scorer: ContrastiveQualityScorer) -> None:
    assert scorer.score([]).shape == (0, len(METRICS))


def test_empty_table_is_refused(scorer: ContrastiveQualityScorer) -> None:
    with pytest.raises(ValueError, match="metric"):
        ContrastiveQualityScorer(scorer.model, scorer.processor, ())


def test_tensor_features_score_the_same(
    scorer: ContrastiveQualityScorer,
    images: list[Image.Image],
    tiny_models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers 4's ``get_*_features`` return the projected tensor itself."""
    model, processor = load_clip(str(tiny_models["clip"]))
    for name in ("get_text_features", "get_image_features"):
        method = getattr(model, name)
        monkeypatch.setattr(model, name, lambda method=method, **kw: method(**kw).pooler_output)
    legacy = ContrastiveQualityScorer(model, processor)
    np.testing.assert_allclose(legacy.score(images), scorer.score(images), rtol=0, atol=1e-12)
