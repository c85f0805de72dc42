"""`alembic upgrade head` on an empty database, and no drift between models and migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from db import migrate, queries
from db.models import Base, RoutingDecision
from db.session import get_engine, session_scope
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


TWO_TIER_ROWS = [
    "INSERT INTO generation_requests (id, prompt, width, height, steps, seed, status)"
    " VALUES ('r1', 'a red bicycle', 64, 64, 2, 1, 'done'),"
    " ('r2', 'a cat', 64, 64, 2, 2, 'routed')",
    "INSERT INTO routing_decisions (request_id, router_version, predicted_prs, alpha,"
    " wants_cloud, tier, explore, budget_reason)"
    " VALUES ('r1', 'baseline:noun_count', 0.3, 0.41, true, 'cloud', true, 'granted'),"
    " ('r2', 'baseline:noun_count', 0.7, 0.41, false, 'edge', false, 'not wanted')",
    "INSERT INTO generations (request_id, tier, model, image_path, latency_ms)"
    " VALUES ('r1', 'edge', 'm', 'r1/edge.png', 1), ('r1', 'cloud', 'm', 'r1/cloud.png', 2)",
    "INSERT INTO quality_scores (generation_id, request_id, tier, metrics_version, scores,"
    " mean_score) SELECT id, request_id, tier, 'v1',"
    ' \'{"names": ["a"], "values": [0.25]}\', 0.25 FROM generations',
    "INSERT INTO training_pairs (request_id, metrics_version, edge_scores, cloud_scores)"
    " VALUES ('r1', 'v1', '[0.25]', '[0.25]')",
]


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_two_tier_rows_survive_the_move_to_a_pool(
    dialect: str, empty_url: str, tmp_path: Path
) -> None:
    url = empty_url if dialect == "postgresql" else f"sqlite:///{tmp_path}/demo.db"
    migrate.upgrade(url, "0002")
    with get_engine(url).begin() as connection:
        for statement in TWO_TIER_ROWS:
            connection.execute(text(statement))
    migrate.upgrade(url)
    migrate.check(url)
    with session_scope(url) as session:
        decisions = {d.request_id: d for d in session.scalars(select(RoutingDecision))}
        explored = decisions["r1"]
        assert explored.predicted_quality == {"edge": 0.5, "cloud": pytest.approx(0.7)}
        assert (explored.wanted_tier, explored.tier, explored.explored) == (
            "cloud",
            "cloud",
            ["edge"],
        )
        assert explored.tradeoff == pytest.approx((0.5 - 0.41) / 9)
        assert explored.spent == 9.0
        plain = decisions["r2"]
        assert (plain.wanted_tier, plain.tier, plain.explored, plain.spent) == (
            "edge",
            "edge",
            [],
            0.0,
        )
        # The pair lives on in the per-tier scores it was made of.
        assert queries.training_pairs(session, "v1") == [("a red bicycle", [0.25], [0.25])]
        assert {g.tier for g in queries.generations_of(session, "r1")} == {"edge", "cloud"}
    migrate.downgrade(url, "0002")
    with get_engine(url).connect() as connection:
        row = connection.execute(
            text(
                "SELECT predicted_prs, alpha, wants_cloud, explore FROM routing_decisions"
                " WHERE request_id = 'r1'"
            )
        ).one()
        assert row[0] == pytest.approx(0.3) and row[1] == pytest.approx(0.41)
        assert bool(row[2]) and bool(row[3])
        assert connection.execute(text("SELECT count(*) FROM training_pairs")).scalar() == 1
    get_engine(url).dispose()
