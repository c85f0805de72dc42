"""callbacks: an outbox row per request to call back, and every attempt to deliver it

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 23:50:00

* ``callback_deliveries``: one per request with a callback URL, written in the transaction
  that ends the request (the outbox), so a callback is never forgotten between the commit and
  the message that sends it. ``state`` pending, delivered or failed; ``next_attempt_at`` when
  it is due (and the end of an attempt's claim while one is in flight). A partial index holds
  the pending ones, which the sweep reads by due time.
* ``callback_attempts``: one row per POST made, with the receiver's status or the error.

A request that ended before this revision has no delivery: its end was not promised a
callback (no callback was sent for any request before it), so none is backfilled.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CALLBACK_STATE = sa.Enum(
    "pending", "delivered", "failed", name="callback_state", native_enum=False, length=16
)
PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("state", CALLBACK_STATE, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["generation_requests.id"],
            name=op.f("fk_callback_deliveries_request_id_generation_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_deliveries")),
        sa.UniqueConstraint("request_id", name=op.f("uq_callback_deliveries_request_id")),
    )
    op.create_index(
        "ix_callback_deliveries_pending",
        "callback_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_table(
        "callback_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column(
            "attempted_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["callback_deliveries.id"],
            name=op.f("fk_callback_attempts_delivery_id_callback_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_attempts")),
        sa.UniqueConstraint("delivery_id", "number", name="uq_callback_attempts_delivery_number"),
    )


def downgrade() -> None:
    op.drop_table("callback_attempts")
    op.drop_index(
        "ix_callback_deliveries_pending",
        table_name="callback_deliveries",
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.drop_table("callback_deliveries")
