"""dispatches, tier health, reroutes; attempts move from requests to steps

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:40:00

Open requests get the steps they still need, so the sweeper of this revision can follow
them: a queued request its route step, a routed one a step per wanted tier that is not yet
generated or scored.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STEP_STATUS = sa.Enum(
    "pending",
    "running",
    "done",
    "failed",
    "abandoned",
    name="step_status",
    native_enum=False,
    length=16,
)
TIER = sa.Enum("edge", "cloud", name="tier", native_enum=False, length=16)
OPEN = "status IN ('pending', 'running')"


def upgrade() -> None:
    op.create_table(
        "dispatches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("step", sa.String(length=64), nullable=False),
        sa.Column("status", STEP_STATUS, nullable=False),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.Column("starts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "dispatched_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["generation_requests.id"],
            name=op.f("fk_dispatches_request_id_generation_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dispatches")),
        sa.UniqueConstraint("request_id", "step", name="uq_dispatches_request_step"),
    )
    op.create_index(
        "ix_dispatches_open",
        "dispatches",
        ["dispatched_at"],
        unique=False,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    op.create_table(
        "tier_health",
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("open_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("tier", name=op.f("pk_tier_health")),
    )
    with op.batch_alter_table("routing_decisions") as batch:
        batch.add_column(sa.Column("rerouted_from", TIER, nullable=True))
        batch.add_column(sa.Column("reroute_reason", sa.Text(), nullable=True))
    _backfill_open_steps()
    with op.batch_alter_table("generation_requests") as batch:
        batch.drop_column("attempts")


def _backfill_open_steps() -> None:
    # (request id column, step, FROM ... WHERE ...) of each kind of open step.
    open_steps = [
        # A queued request needs routing.
        ("r.id", "route", "generation_requests r WHERE r.status = 'queued'"),
    ]
    for tier in ("edge", "cloud"):
        open_steps += [
            # A wanted tier with no image needs generating.
            (
                "d.request_id",
                f"generate:{tier}",
                "routing_decisions d JOIN generation_requests r ON r.id = d.request_id "
                f"WHERE r.status = 'routed' AND (d.tier = '{tier}' OR d.explore) AND NOT EXISTS "
                f"(SELECT 1 FROM generations g WHERE g.request_id = d.request_id "
                f"AND g.tier = '{tier}')",
            ),
            # An image with no score needs scoring.
            (
                "g.request_id",
                f"score:{tier}",
                "generations g JOIN generation_requests r ON r.id = g.request_id "
                f"WHERE r.status = 'routed' AND g.tier = '{tier}' AND NOT EXISTS "
                "(SELECT 1 FROM quality_scores q WHERE q.generation_id = g.id)",
            ),
        ]
    for request_id, step, source in open_steps:
        op.execute(
            "INSERT INTO dispatches (request_id, step, status, sends, starts, failures) "
            f"SELECT {request_id}, '{step}', 'pending', 1, 0, 0 FROM {source}"
        )


def downgrade() -> None:
    with op.batch_alter_table("generation_requests") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("routing_decisions") as batch:
        batch.drop_column("reroute_reason")
        batch.drop_column("rerouted_from")
    op.drop_table("tier_health")
    op.drop_index(
        "ix_dispatches_open",
        table_name="dispatches",
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    op.drop_table("dispatches")
