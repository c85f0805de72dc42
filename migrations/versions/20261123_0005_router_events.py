"""router events: every registration, promotion, refusal and rollback of a router version

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 23:00:00

``router_versions.is_active`` says which version serves now; ``router_events`` says how it
came to: what the promotion gate decided on each candidate (and on what held-out evidence),
and every promotion and rollback by the retraining job or an operator. When a version served
is read from it (``t2iroute models list``). ``version`` is a name rather than a foreign key:
the baseline policy that serves before any version (``baseline:<policy>``) has events too.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "router_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version", sa.String(200), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "event IN ('registered', 'promoted', 'refused', 'rolled_back')",
            name=op.f("ck_router_events_event"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_router_events")),
    )
    op.create_index("ix_router_events_version_id", "router_events", ["version", "id"])


def downgrade() -> None:
    op.drop_index("ix_router_events_version_id", table_name="router_events")
    op.drop_table("router_events")
