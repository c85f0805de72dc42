"""``/healthz`` (the process is up) and ``/readyz`` (what it needs answers)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter

from db import queries
from db.session import session_scope
from workers.entrypoints.http.deps import SettingsDep
from workers.entrypoints.http.problems import Problem, problem_responses
from workers.schemas import Readiness
from workers.services.budget import budget_redis
from workers.services.images import ImageStore, StoreUnavailable
from workers.services.producer import FieldProblem
from workers.settings import Settings

__all__ = ["READINESS", "router"]

log = logging.getLogger(__name__)

#: How long readiness waits for the broker and the budget Redis.
READY_TIMEOUT_SECONDS = 2.0

router = APIRouter()


@router.get("/healthz")
def health() -> dict[str, str]:
    """The process is up (readiness is /readyz)."""
    return {"status": "ok"}


def _database(settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        queries.ping(session)


def _broker(settings: Settings) -> None:
    from kombu import Connection

    with Connection(settings.broker_url, connect_timeout=READY_TIMEOUT_SECONDS) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=READY_TIMEOUT_SECONDS)


def _budget_redis(settings: Settings) -> None:
    if settings.budget_backend == "redis":
        budget_redis(settings.redis_url, READY_TIMEOUT_SECONDS).ping()


def _image_store(settings: Settings) -> None:
    ImageStore(settings.image_store).check_writable()


READINESS: dict[str, Callable[[Settings], None]] = {
    "database": _database,
    "broker": _broker,
    "budget": _budget_redis,
    "images": _image_store,
}


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
def ready(settings: SettingsDep) -> Readiness:
    """Ready when the database, the broker and the budget Redis answer and the image store
    takes a small file; else a 503 problem naming what does not (the error itself goes to the
    log, not to the caller)."""
    down: list[FieldProblem] = []
    for name, check in READINESS.items():
        try:
            check(settings)
        except StoreUnavailable as exc:
            log.warning("readiness: %s cannot take a file: %s", name, exc)
            down.append(FieldProblem(name, f"cannot take a file ({exc.reason})"))
        except Exception as exc:
            log.warning("readiness: %s is unreachable", name, exc_info=True)
            down.append(FieldProblem(name, f"unreachable ({type(exc).__name__})"))
    if down:
        raise Problem(
            503,
            "not-ready",
            "Not ready",
            "not ready: " + "; ".join(f"{p.field}: {p.message}" for p in down),
            errors=down,
        )
    return Readiness(status="ready", checks=dict.fromkeys(READINESS, "ok"))
