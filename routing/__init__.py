"""The routing method: quality metrics, PRS, router models, training, calibration,
baselines and evaluation. Pure Python/PyTorch: imports neither Celery nor the database."""

from routing.types import PairTable, PoolRouter, PoolTable, Router

__all__ = ["PairTable", "PoolRouter", "PoolTable", "Router"]
