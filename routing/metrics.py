"""The ten contrastive quality metrics (RouteT2I, Sec. 3.1): each a pair of positive and
negative texts scored against an image with CLIP. The table is versioned data: a change of
any text is a new version, and scores carry the version they were made with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    positive: str
    negative: str


METRICS_VERSION = "v1"

METRICS: tuple[Metric, ...] = (
    Metric("definition", "High definition photo.", "Low definition photo."),
    Metric("detail", "Photo with rich details.", "Photo with few details."),
    Metric("clarity", "Clear photo.", "Blurry photo."),
    Metric("sharpness", "Sharp photo.", "Fuzzy photo."),
    Metric("harmony", "Harmonious photo.", "Disharmonious photo."),
    Metric("realism", "Realistic photo.", "Unrealistic photo."),
    Metric("color", "Photo with vivid colors.", "Photo with dull colors."),
    Metric("consistency", "Consistent photo.", "Inconsistent photo."),
    Metric("layout", "Photo with a good layout.", "Photo with a bad layout."),
    Metric("integrity", "Photo of complete objects.", "Photo of broken objects."),
)

METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)

# Equal weights unless configured otherwise; PRS needs weights that sum to one.
DEFAULT_WEIGHTS: tuple[float, ...] = tuple(1.0 / len(METRICS) for _ in METRICS)
