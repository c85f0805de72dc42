"""Retraining is safe: two runs at once (two beat ticks) train once, the lock expires if
its holder dies, and a run that fails leaves the serving version as it was. On the real test
PostgreSQL and Redis, with real RouteT2I fits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from db import queries
from db.models import RouterEventRow, RouterVersion
from db.session import session_scope
from routing.baselines import PromptLengthRouter
from routing.registry import save_router
from tests.labels import seed_training_pairs
from workers.engine.tasks import retrain
from workers.services.retraining import LOCK_NAME, retrain_lock, retrain_router
from workers.settings import Settings, get_settings


@pytest.fixture
def labelled(
    clean_db: str, clean_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """64 labelled pairs, and settings (those the task reads too) that retrain from 40."""
    seed_training_pairs(clean_db, 64)
    monkeypatch.setenv("T2IROUTE_RETRAIN_MIN_PAIRS", "40")
    get_settings.cache_clear()
    settings = get_settings()
    redis.Redis.from_url(settings.redis_url).delete(LOCK_NAME)
    yield settings
    monkeypatch.undo()
    get_settings.cache_clear()


def _counts(url: str) -> tuple[int, int]:
    with session_scope(url) as session:
        versions = session.scalar(select(func.count(RouterVersion.id))) or 0
        events = session.scalar(select(func.count(RouterEventRow.id))) or 0
    return versions, events


def test_two_ticks_at_once_retrain_once(labelled: Settings) -> None:
    results: list[dict[str, Any]] = []
    start = threading.Barrier(2)

    def tick() -> None:
        start.wait()
        results.append(retrain.run())

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    statuses = sorted(r["status"] for r in results)
    assert statuses[0] in ("promoted", "refused") and statuses[1] == "skipped", results
    assert "lock" in next(r for r in results if r["status"] == "skipped")["reason"]
    versions, events = _counts(labelled.database_url)
    assert versions == 1 and events == 2  # registered, then promoted or refused
    # Released after the run: the next tick trains again.
    with retrain_lock(labelled) as held:
        assert held


def test_the_lock_expires_with_its_holder(labelled: Settings) -> None:
    client = redis.Redis.from_url(labelled.redis_url)
    with retrain_lock(labelled) as held:
        assert held
        ttl = client.pttl(LOCK_NAME)
        assert 0 < ttl <= (labelled.retrain_time_limit + 60) * 1000
        with retrain_lock(labelled) as second:
            assert not second
    assert client.exists(LOCK_NAME) == 0


def test_a_failed_retrain_leaves_the_serving_version(labelled: Settings, tmp_path: Path) -> None:
    serving = tmp_path / "v1"
    save_router(PromptLengthRouter(), serving)
    with session_scope(labelled.database_url) as session:
        session.add(
            RouterVersion(
                version="v1", kind="prompt_length", path=str(serving), n_train_pairs=10,
                evaluation={}, is_active=True,
            )
        )  # fmt: skip
    # The model store is a file: saving the candidate fails after it was trained and judged.
    blocked = tmp_path / "store"
    blocked.write_text("not a folder")
    broken = labelled.model_copy(update={"model_store": blocked})
    with pytest.raises(OSError):
        retrain_router(broken)
    with session_scope(labelled.database_url) as session:
        active = queries.active_router_version(session)
        assert active is not None and active.version == "v1"
    assert _counts(labelled.database_url) == (1, 0)
