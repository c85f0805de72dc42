"""The plans of the HTTP API's listing and budget queries on full tables (as
tests/integration/test_plans.py does for the workers' queries): each query function is called
as the API calls it, the statements it sends caught and explained (EXPLAIN ANALYZE), on
analysed tables of 100,000 requests. A page of the listing, everyone's or one key's, with or
without a cursor or filters, walks its index and reads about a page of requests; the budget's
window reads the decisions and images of the window by their created_at indexes. None scans
a table whole.

Unlike the workers' lookups by key, these are ranges (a window, the rows after a cursor),
whose selectivity the planner cannot know on a table never analysed: there it may read one
key's requests whole and sort them, until autovacuum's first ANALYZE (minutes after a
restore). A listing is a read that can take that; the workers' hot path is checked on fresh
tables too (test_plans.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from db import migrate, queries
from db.models import Status
from tests.environment import TEST_DATABASE
from tests.integration.test_plans import explain, statements_of
from tests.services import drop_database, recreate_database
from workers.settings import Settings

pytestmark = pytest.mark.integration

PLANS_DB = f"{TEST_DATABASE}_api_plans"
REQUESTS = 100_000
PAGE = 50
TABLES = ("api_keys", "generation_requests", "routing_decisions", "generations")
# Two keys; a third of the requests made with each, the rest without one. One a second over
# the last hours; a tenth queued, the rest routed to edge or cloud with an image.
FILL = [
    "INSERT INTO api_keys (name, key_prefix, key_hash, is_admin, callback_secret)"
    " VALUES ('a', 't2i_aaaa', repeat('a', 64), false, 's'),"
    " ('b', 't2i_bbbb', repeat('b', 64), false, 's')",
    "INSERT INTO generation_requests (id, prompt, width, height, seed, status, created_at,"
    " updated_at, idempotency_key, api_key_id)"
    " SELECT gen_random_uuid()::text, 'prompt ' || g, 64, 64, g,"
    " CASE g % 10 WHEN 0 THEN 'queued' ELSE 'done' END,"
    " now() - make_interval(secs => g), now() - make_interval(secs => g), 'key-' || g,"
    " (SELECT id FROM api_keys WHERE name = CASE g % 3 WHEN 0 THEN 'a' ELSE 'b' END"
    "  AND g % 3 <> 2)"
    " FROM generate_series(1, :requests) g",
    "INSERT INTO routing_decisions (request_id, router_version, predicted_quality, tradeoff,"
    " wanted_tier, tier, explored, spent, budget_reason, escalations, created_at)"
    " SELECT id, 'v1', '{\"edge\": 0.5, \"cloud\": 0.7}', 0.1, 'edge',"
    " CASE seed % 4 WHEN 0 THEN 'cloud' ELSE 'edge' END, '[]', 0, 'granted', '[]', created_at"
    " FROM generation_requests WHERE status <> 'queued' ORDER BY seed",
    "INSERT INTO generations (request_id, tier, model, image_path, latency_ms, created_at)"
    " SELECT request_id, tier, 'm', request_id || '.png', 1.0, created_at"
    " FROM routing_decisions ORDER BY id",
]


@dataclass(frozen=True)
class Sample:
    key_id: int
    #: The created_at and id of a request deep in the table: a cursor of a later page.
    cursor: tuple[datetime, str]
    now: datetime


@dataclass(frozen=True)
class ApiQuery:
    """A query function as the API calls it; the indexes its statements may take on each
    table they read; the most rows any of its scans may read."""

    name: str
    call: Callable[[Session, Sample], object]
    indexes: dict[str, frozenset[str]]
    most_rows: int


ORDER = frozenset({"ix_generation_requests_created_at_id"})
OWNED = frozenset({"ix_generation_requests_api_key_created_at"})
WINDOW = timedelta(minutes=10)

API_QUERIES = [
    ApiQuery(
        "a page of everyone's",
        lambda s, x: queries.list_requests(s, queries.RequestFilter(), limit=PAGE + 1),
        {"generation_requests": ORDER},
        PAGE + 1,
    ),
    ApiQuery(
        "a later page of everyone's",
        lambda s, x: queries.list_requests(
            s, queries.RequestFilter(), limit=PAGE + 1, before=x.cursor
        ),
        {"generation_requests": ORDER},
        PAGE + 1,
    ),
    ApiQuery(
        "a page of one key's",
        lambda s, x: queries.list_requests(
            s, queries.RequestFilter(owner=x.key_id), limit=PAGE + 1, before=x.cursor
        ),
        {"generation_requests": OWNED},
        PAGE + 1,
    ),
    ApiQuery(
        "a page of one key's done requests",
        lambda s, x: queries.list_requests(
            s,
            queries.RequestFilter(owner=x.key_id, status=Status.DONE),
            limit=PAGE + 1,
        ),
        {"generation_requests": OWNED},
        2 * PAGE,
    ),
    ApiQuery(
        "a page of one tier's",
        lambda s, x: queries.list_requests(s, queries.RequestFilter(tier="cloud"), limit=PAGE + 1),
        {
            "generation_requests": ORDER,
            "routing_decisions": frozenset({"uq_routing_decisions_request_id"}),
        },
        # A quarter of the requests answered by cloud, a tenth not routed: about 4.4 pages.
        6 * PAGE,
    ),
    ApiQuery(
        "a key's idempotency key",
        lambda s, x: queries.list_requests(
            s,
            queries.RequestFilter(owner=x.key_id, idempotency_key="key-300"),
            limit=PAGE + 1,
        ),
        {"generation_requests": frozenset({"uq_generation_requests_owner_key"}) | OWNED},
        1,
    ),
    ApiQuery(
        "the budget's window",
        lambda s, x: queries.spend_since(s, x.now - WINDOW),
        {
            "routing_decisions": frozenset({"ix_routing_decisions_created_at"}),
            "generations": frozenset({"ix_generations_created_at"}),
        },
        int(WINDOW.total_seconds()),
    ),
]


@dataclass(frozen=True)
class Tables:
    engine: Engine
    sample: Sample


@pytest.fixture(scope="module")
def tables(settings: Settings) -> Iterator[Tables]:
    """A database of its own, filled and analysed, autovacuum off on the filled tables."""
    recreate_database(PLANS_DB)
    url = settings.database_url.rsplit("/", 1)[0] + f"/{PLANS_DB}"
    migrate.upgrade(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        for statement in FILL:
            connection.execute(text(statement), {"requests": REQUESTS})
        connection.execute(text(f"ANALYZE {', '.join(TABLES)}"))
    with Session(engine) as session:
        key_id = session.scalar(text("SELECT id FROM api_keys WHERE name = 'a'"))
        created_at, request_id = session.execute(
            text("SELECT created_at, id FROM generation_requests WHERE seed = :n"),
            {"n": REQUESTS // 2},
        ).one()
        sample = Sample(int(key_id), (created_at, request_id), queries.database_now(session))
    try:
        yield Tables(engine, sample)
    finally:
        engine.dispose()
        drop_database(PLANS_DB)


def _scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child)


@pytest.mark.parametrize("query", API_QUERIES, ids=[q.name for q in API_QUERIES])
def test_api_queries_walk_their_indexes(tables: Tables, query: ApiQuery) -> None:
    statements = statements_of(tables.engine, lambda s: query.call(s, tables.sample))
    assert statements
    for statement, parameters in statements:
        plan = explain(tables.engine, statement, parameters)
        for scan in _scans(plan):
            table = scan["Relation Name"]
            assert table in query.indexes, f"{query.name} reads {table}: {plan}"
            assert scan.get("Index Name") in query.indexes[table], (
                f"{query.name}: {scan['Node Type']} on {table}: {plan}"
            )
            # Per loop: a nested loop's inner lookup reads a row for each outer one.
            read = scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
            assert read <= query.most_rows, f"{query.name} read {read} rows of {table}: {plan}"
