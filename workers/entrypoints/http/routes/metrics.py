"""``GET /metrics``: Prometheus exposition of the API's counters and the system's state."""

from __future__ import annotations

from fastapi import APIRouter, Response

from workers.services.telemetry import api_exposition

__all__ = ["router"]

router = APIRouter()


@router.get("/metrics", response_class=Response)
def metrics() -> Response:
    """Prometheus metrics: the API's counters and the system's state
    (workers/services/telemetry.py)."""
    body, content_type = api_exposition()
    return Response(body, media_type=content_type)
