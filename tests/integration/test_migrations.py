"""`alembic upgrade head` on an empty database, and no drift between models and migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect

from db import migrate
from db.models import Base
from db.session import get_engine
from tests.services import drop_database, recreate_database
from workers.settings import Settings

SCRATCH_DB = "t2iroute_migrations"


@pytest.fixture
def empty_url(settings: Settings) -> Iterator[str]:
    recreate_database(SCRATCH_DB)
    url = settings.database_url.rsplit("/", 1)[0] + f"/{SCRATCH_DB}"
    yield url
    get_engine(url).dispose()
    drop_database(SCRATCH_DB)


def test_upgrade_head_creates_every_table_and_matches_models(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    tables = set(inspect(get_engine(empty_url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    migrate.check(empty_url)


def test_downgrade_to_base_and_back(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    migrate.downgrade(empty_url, "base")
    assert set(inspect(get_engine(empty_url)).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(empty_url)
    migrate.check(empty_url)


def test_embedded_sqlite_database_migrates_too(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    migrate.upgrade(url)
    migrate.check(url)
