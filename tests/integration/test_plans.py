"""The plans of the hot queries on full tables: each query function is called as a worker
calls it, the statements it sends caught on their way to the driver, and each statement
explained (EXPLAIN ANALYZE, rolled back). On tables never analysed (the planner guesses from
defaults, as after a deploy or a restore), on the same analysed, and on young ones (800
requests, where the old status index used to win), a single-request lookup goes by primary
key or unique index, a router version's recent decisions by their index, the sweeper's
steps by the index of unfinished ones; none scans a table whole or reads rows its answer
does not need.

To check another query function, add a ``HotQuery`` to ``HOT_QUERIES``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session

from db import migrate, queries
from db.models import Status, StepStatus
from tests.environment import TEST_DATABASE
from tests.services import drop_database, recreate_database
from workers.settings import Settings

pytestmark = pytest.mark.integration

PLANS_DB = f"{TEST_DATABASE}_plans"
TABLES = (
    "generation_requests",
    "routing_decisions",
    "dispatches",
    "generations",
    "quality_scores",
)
# Decisions of the version promoted a moment ago; the older versions share the rest.
NEW_VERSION, NEW_DECISIONS = "v-new", 20
OLD_VERSION = "v1"
WINDOW = 50

# A tenth of the requests queued (their route step pending), a tenth routed (route and
# generate done, score running), a tenth failed, the rest done; every request but the
# queued has a decision. Steps were sent over the last hours, one a second.
FILL = [
    "INSERT INTO generation_requests (id, prompt, width, height, seed, status)"
    " SELECT gen_random_uuid()::text, 'prompt ' || g, 64, 64, g,"
    " CASE g % 10 WHEN 0 THEN 'queued' WHEN 1 THEN 'routed' WHEN 2 THEN 'failed'"
    " ELSE 'done' END FROM generate_series(1, :requests) g",
    "INSERT INTO routing_decisions (request_id, router_version, predicted_quality, tradeoff,"
    " wanted_tier, tier, explored, spent, budget_reason, escalations)"
    " SELECT id, CASE WHEN row_number() OVER (ORDER BY seed DESC) <= :new_decisions"
    " THEN :new_version ELSE 'v' || (seed % 3 + 1) END,"
    " '{\"edge\": 0.5, \"cloud\": 0.7}', 0.1, 'edge', 'edge', '[]', 0, 'granted', '[]'"
    " FROM generation_requests WHERE status <> 'queued' ORDER BY seed",
    "INSERT INTO dispatches (request_id, step, status, sends, starts, failures,"
    " dispatched_at, started_at, finished_at)"
    " SELECT r.id, s.step, s.status, 1, s.starts, 0, t.sent,"
    " CASE WHEN s.starts > 0 THEN t.sent END,"
    " CASE WHEN s.status NOT IN ('pending', 'running') THEN t.sent END"
    " FROM generation_requests r"
    " CROSS JOIN LATERAL (SELECT now() - make_interval(secs => r.seed) AS sent) t"
    " CROSS JOIN LATERAL (VALUES"
    " ('route', CASE WHEN r.status = 'queued' THEN 'pending' ELSE 'done' END,"
    " CASE WHEN r.status = 'queued' THEN 0 ELSE 1 END),"
    " ('generate:edge', 'done', 1),"
    " ('score:edge', CASE WHEN r.status = 'routed' THEN 'running' ELSE 'done' END, 1)"
    " ) AS s(step, status, starts)"
    " WHERE s.step = 'route' OR r.status <> 'queued' ORDER BY r.seed, s.step",
    "INSERT INTO generations (request_id, tier, model, image_path, latency_ms, worker)"
    " SELECT id, 'edge', 'm', id || '.png', 1.0, 'w' FROM generation_requests"
    " WHERE status <> 'queued' ORDER BY seed",
    "INSERT INTO quality_scores (generation_id, request_id, tier, metrics_version, scores,"
    " mean_score) SELECT g.id, g.request_id, g.tier, 'v1', '{\"values\": [0.5]}', 0.5"
    " FROM generations g JOIN generation_requests r ON r.id = g.request_id"
    " WHERE r.status = 'done' ORDER BY g.id",
]


@dataclass(frozen=True)
class Sample:
    """Rows of the filled tables for the queries to look up."""

    #: A queued request, and a routed one whose ``running_step`` is running.
    queued: str
    routed: str
    running_step: str
    #: Requests in the tables, and a batch of routed ones (what a batched task reads and
    #: writes at once).
    requests: int
    batch: list[str]
    #: Open steps as the sweeper read them at ``now``, every one lost.
    lost: list[queries.OverdueStep]
    now: datetime
    #: Steps not finished, and decisions per router version, in the tables.
    open_steps: int
    decisions: dict[str, int]


@dataclass(frozen=True)
class HotQuery:
    """A query function as a worker calls it; for each statement it sends, in order, the
    indexes it may take (at least one of them, no other); and the most table rows any of its
    statements may read (returned or filtered out)."""

    name: str
    call: Callable[[Session, Sample], object]
    indexes: tuple[frozenset[str], ...]
    most_rows: Callable[[Sample], int]
    #: Checked on tables of at least this many requests. A batch of 32 ids in a young table
    #: of 800 is a sizable share of its few pages: one sequential pass is the planner's
    #: right choice there, and the index is taken from a few thousand rows on.
    min_requests: int = 0


def either(*names: str) -> frozenset[str]:
    return frozenset(names)


BATCH = 32
BATCH_TABLE = 10_000


def _batch(_: Sample) -> int:
    # Each request of the batch once, and no other.
    return BATCH


def _few(_: Sample) -> int:
    # One request, or the three steps of one.
    return 3


HOT_QUERIES = [
    HotQuery(
        "transition",
        lambda s, x: queries.transition(
            s, x.queued, from_status=Status.QUEUED, to_status=Status.ROUTED
        ),
        (either("pk_generation_requests"),),
        _few,
    ),
    HotQuery(
        "fail",
        lambda s, x: queries.fail(s, x.routed, "a reason"),
        (either("pk_generation_requests"), either("uq_dispatches_request_step")),
        _few,
    ),
    HotQuery(
        "start_step",
        lambda s, x: queries.start_step(s, x.routed, x.running_step, redelivered=True),
        (either("uq_dispatches_request_step"),),
        _few,
    ),
    HotQuery(
        "finish_step",
        lambda s, x: queries.finish_step(s, x.routed, x.running_step),
        (either("uq_dispatches_request_step"),),
        _few,
    ),
    HotQuery(
        "fail_attempt",
        lambda s, x: queries.fail_attempt(s, x.routed, x.running_step, "an error"),
        (either("uq_dispatches_request_step"),),
        _few,
    ),
    # No more rows than the version has decisions. Without statistics the planner guesses
    # that a version has few, and may read all of its own and sort them rather than walk its
    # index back to the window; with them, for a version that holds a good share of the
    # decisions, it may walk the primary key back through the newest decisions instead.
    HotQuery(
        "recent_predictions of a version just promoted",
        lambda s, x: queries.recent_predictions(s, WINDOW, NEW_VERSION),
        (either("ix_routing_decisions_router_version_id", "pk_routing_decisions"),),
        lambda x: x.decisions[NEW_VERSION],
    ),
    HotQuery(
        "recent_predictions of an old version",
        lambda s, x: queries.recent_predictions(s, WINDOW, OLD_VERSION),
        (either("ix_routing_decisions_router_version_id", "pk_routing_decisions"),),
        lambda x: x.decisions[OLD_VERSION],
    ),
    HotQuery(
        "overdue_steps",
        lambda s, x: queries.overdue_steps(s, x.now, limit=100),
        (either("ix_dispatches_unfinished"),),
        lambda x: x.open_steps,
    ),
    HotQuery(
        "claim_resends",
        lambda s, x: queries.claim_resends(s, x.lost, x.now),
        (either("pk_dispatches"),),
        lambda x: len(x.lost),
    ),
    # The batched stages: one statement for a batch of requests, one index lookup per id.
    HotQuery(
        "get_requests",
        lambda s, x: queries.get_requests(s, x.batch),
        (either("pk_generation_requests"),),
        _batch,
        min_requests=BATCH_TABLE,
    ),
    HotQuery(
        "get_decisions",
        lambda s, x: queries.get_decisions(s, x.batch, for_update=True),
        (either("uq_routing_decisions_request_id"),),
        _batch,
        min_requests=BATCH_TABLE,
    ),
    HotQuery(
        "get_generations",
        lambda s, x: queries.get_generations(s, x.batch, ["edge"]),
        (either("uq_generations_request_tier"),),
        _batch,
        min_requests=BATCH_TABLE,
    ),
    HotQuery(
        "scored_tiers_many",
        lambda s, x: queries.scored_tiers_many(s, x.batch, "v1"),
        (either("ix_quality_scores_request_version"),),
        _batch,
        min_requests=BATCH_TABLE,
    ),
    HotQuery(
        "transition_many",
        lambda s, x: queries.transition_many(
            s, x.batch, from_status=Status.ROUTED, to_status=Status.DONE
        ),
        (either("pk_generation_requests"),),
        _batch,
        min_requests=BATCH_TABLE,
    ),
    HotQuery(
        "start_steps",
        lambda s, x: queries.start_steps(s, x.batch, x.running_step, redelivered=x.batch[:3]),
        (either("uq_dispatches_request_step"),),
        _batch,
        min_requests=BATCH_TABLE,
    ),
    HotQuery(
        "finish_steps",
        lambda s, x: queries.finish_steps(s, x.batch, x.running_step),
        (either("uq_dispatches_request_step"),),
        _batch,
        min_requests=BATCH_TABLE,
    ),
    HotQuery(
        "mark_seen",
        lambda s, x: queries.mark_seen(s, [step.id for step in x.lost], x.now),
        (either("pk_dispatches"),),
        lambda x: len(x.lost),
    ),
]


@dataclass(frozen=True)
class Tables:
    engine: Engine
    sample: Sample


@pytest.fixture(
    scope="module",
    # (requests, analysed, steps lost in a sweep). A young system loses a handful: for
    # dozens, reading its small table through is the planner's right choice.
    params=[(12_000, False, 100), (12_000, True, 100), (800, False, 5)],
    ids=["fresh", "analysed", "young"],
)
def tables(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Tables]:
    """A database of its own, filled, with autovacuum off on the filled tables so that
    nothing analyses them behind the test's back; analysed only where the param says."""
    requests, analysed, lost = request.param
    recreate_database(PLANS_DB)
    url = settings.database_url.rsplit("/", 1)[0] + f"/{PLANS_DB}"
    migrate.upgrade(url)
    engine = create_engine(url)
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        for statement in FILL:
            connection.execute(
                text(statement),
                {"requests": requests, "new_decisions": NEW_DECISIONS, "new_version": NEW_VERSION},
            )
        if analysed:
            connection.execute(text(f"ANALYZE {', '.join(TABLES)}"))
    try:
        yield Tables(engine, _sample(engine, requests, lost))
    finally:
        engine.dispose()
        drop_database(PLANS_DB)


def _sample(engine: Engine, requests: int, lost_steps: int) -> Sample:
    with Session(engine) as session:
        statuses = {
            status: session.scalar(
                text(
                    "SELECT id FROM generation_requests WHERE status = :s ORDER BY seed OFFSET :n"
                ),
                {"s": status, "n": requests // 40},
            )
            for status in ("queued", "routed")
        }
        batch = list(
            session.scalars(
                text(
                    "SELECT id FROM generation_requests WHERE status = 'routed'"
                    " ORDER BY seed OFFSET :n LIMIT :size"
                ),
                {"n": requests // 40, "size": BATCH},
            )
        )
        now = queries.database_now(session)
        open_steps = session.scalar(
            text("SELECT count(*) FROM dispatches WHERE finished_at IS NULL")
        )
        lost = queries.overdue_steps(session, now, limit=lost_steps)
        decisions = {
            str(version): int(n)
            for version, n in session.execute(
                text("SELECT router_version, count(*) FROM routing_decisions GROUP BY 1")
            )
        }
    assert len(lost) == lost_steps and all(
        s.status in (StepStatus.PENDING, StepStatus.RUNNING) for s in lost
    )
    return Sample(
        queued=str(statuses["queued"]),
        routed=str(statuses["routed"]),
        running_step="score:edge",
        requests=requests,
        batch=batch,
        lost=lost,
        now=now,
        open_steps=int(open_steps or 0),
        decisions=decisions,
    )


def statements_of(engine: Engine, call: Callable[[Session], object]) -> list[tuple[str, Any]]:
    """The statements (with their driver parameters) that ``call`` sends, its changes rolled
    back."""
    sent: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", catch)
    try:
        with Session(engine) as session:
            call(session)
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", catch)
    return sent


def explain(engine: Engine, statement: str, parameters: Any) -> dict[str, Any]:
    """The executed plan (EXPLAIN ANALYZE, FORMAT JSON) of a statement, its changes rolled
    back."""
    with engine.connect() as connection:
        (document,) = connection.exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters
        ).scalar_one()
        connection.rollback()
    return dict(document["Plan"])


@dataclass(frozen=True)
class Reads:
    """What a plan read: the tables it scanned whole, the indexes it took, and the table rows
    its scans went through (returned or filtered out; the dead versions of rows that the
    rolled-back statements of other tests left behind do not count)."""

    seq_scans: frozenset[str]
    indexes: frozenset[str]
    rows: int


def reads(plan: dict[str, Any]) -> Reads:
    seq_scans: set[str] = set()
    indexes: set[str] = set()
    rows = 0
    stack = [plan]
    while stack:
        node = stack.pop()
        stack.extend(node.get("Plans", []))
        if not node["Node Type"].endswith("Scan"):
            continue
        if node["Node Type"] == "Seq Scan":
            seq_scans.add(node["Relation Name"])
        if "Index Name" in node:
            indexes.add(node["Index Name"])
        if "Relation Name" in node:
            seen = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            seen += node.get("Rows Removed by Index Recheck", 0)
            rows += seen * node["Actual Loops"]
    return Reads(frozenset(seq_scans), frozenset(indexes), rows)


def node_types(plan: dict[str, Any]) -> Sequence[str]:
    """The plan's nodes, outermost first, as "Node Type on index or table" (for messages)."""
    found = []
    stack = [plan]
    while stack:
        node = stack.pop()
        stack.extend(reversed(node.get("Plans", [])))
        target = node.get("Index Name") or node.get("Relation Name") or node.get("Alias", "")
        found.append(f"{node['Node Type']} {target}".strip())
    return found


@pytest.mark.parametrize("hot", HOT_QUERIES, ids=[hot.name for hot in HOT_QUERIES])
def test_a_hot_query_reads_by_its_index_whatever_the_statistics(
    tables: Tables, hot: HotQuery
) -> None:
    if tables.sample.requests < hot.min_requests:
        pytest.skip(f"a batch reads a table of {tables.sample.requests} requests through")
    sent = statements_of(tables.engine, lambda session: hot.call(session, tables.sample))
    assert len(sent) == len(hot.indexes), [statement for statement, _ in sent]
    for (statement, parameters), indexes in zip(sent, hot.indexes, strict=True):
        plan = explain(tables.engine, statement, parameters)
        read = reads(plan)
        shape = f"{statement}\n{node_types(plan)}"
        assert not read.seq_scans, shape
        assert read.indexes and read.indexes <= indexes, shape
        assert read.rows <= hot.most_rows(tables.sample), f"{read.rows} rows read: {shape}"
