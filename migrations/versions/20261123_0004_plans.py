"""indexes whose plans do not depend on statistics

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 20:30:00

* ``ix_generation_requests_status_updated`` goes: no query selects requests by status alone,
  and on a fresh table the planner took it for a transition's ``id = ... AND status IN``,
  reading every request in that status instead of one by primary key.
* ``ix_dispatches_open`` (``WHERE status IN ('pending', 'running')``) becomes
  ``ix_dispatches_unfinished`` (``WHERE finished_at IS NULL``, the same steps): lookups of a
  request's open steps by status could take the old one and read every open step.
* ``ix_routing_decisions_router_version_id``: a version's most recent decisions without a
  scan of the whole table.
* ``ix_quality_scores_request`` gains ``metrics_version``: a batch's scores (``request_id
  IN (...) AND metrics_version = ...``) are then selective enough for it without statistics.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('pending', 'running')"
UNFINISHED = "finished_at IS NULL"


def upgrade() -> None:
    op.drop_index("ix_generation_requests_status_updated", table_name="generation_requests")
    op.drop_index(
        "ix_dispatches_open",
        table_name="dispatches",
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    op.create_index(
        "ix_dispatches_unfinished",
        "dispatches",
        ["dispatched_at"],
        unique=False,
        postgresql_where=sa.text(UNFINISHED),
        sqlite_where=sa.text(UNFINISHED),
    )
    op.create_index(
        "ix_routing_decisions_router_version_id",
        "routing_decisions",
        ["router_version", "id"],
        unique=False,
    )
    op.drop_index("ix_quality_scores_request", table_name="quality_scores")
    op.create_index(
        "ix_quality_scores_request_version",
        "quality_scores",
        ["request_id", "metrics_version"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_quality_scores_request_version", table_name="quality_scores")
    op.create_index("ix_quality_scores_request", "quality_scores", ["request_id"], unique=False)
    op.drop_index("ix_routing_decisions_router_version_id", table_name="routing_decisions")
    op.drop_index(
        "ix_dispatches_unfinished",
        table_name="dispatches",
        postgresql_where=sa.text(UNFINISHED),
        sqlite_where=sa.text(UNFINISHED),
    )
    op.create_index(
        "ix_dispatches_open",
        "dispatches",
        ["dispatched_at"],
        unique=False,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    op.create_index(
        "ix_generation_requests_status_updated",
        "generation_requests",
        ["status", "updated_at"],
        unique=False,
    )
