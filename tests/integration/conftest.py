"""Fixtures on the machine's real Postgres and Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import text

from db import migrate
from db.session import session_scope
from tests.services import flush_redis, recreate_database
from workers.settings import Settings, get_settings

TABLES = (
    "quality_scores, generations, routing_decisions, router_versions, "
    "dispatches, tier_health, generation_requests, router_events"
)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def database(settings: Settings) -> str:
    recreate_database()
    migrate.upgrade(settings.database_url)
    return settings.database_url


@pytest.fixture
def clean_db(database: str) -> Iterator[str]:
    with session_scope(database) as session:
        session.execute(text(f"TRUNCATE {TABLES} CASCADE"))
    yield database


@pytest.fixture
def clean_redis(settings: Settings) -> Iterator[redis.Redis]:
    flush_redis(settings.broker_url, settings.redis_url)
    client = redis.Redis.from_url(settings.broker_url)
    yield client
    client.close()
