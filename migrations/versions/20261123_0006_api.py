"""HTTP API: API keys, a request's callback URL, metadata and owner, cancelled requests

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 23:30:00

* ``api_keys``: a key's SHA-256, never the key; its callback secret; revocation.
* ``generation_requests`` gains ``callback_url``, ``client_metadata`` (the caller's JSON object,
  handed back) and ``api_key_id`` (the key that made it: only that key, or an admin key,
  reads it).
* The idempotency key becomes its caller's: ``uq_generation_requests_idempotency_key`` gives
  way to a unique ``(api_key_id, idempotency_key)``, so two API keys that pick the same
  idempotency key never meet, and to a partial unique index on ``idempotency_key`` where
  ``api_key_id IS NULL``: the requests made without a key share one namespace, as before
  (a unique constraint holds NULLs distinct). No expression index: SQLite cannot reflect
  one, and a later batch migration of the table would drop it unseen.
* The listing's indexes: ``(created_at, id)`` for all requests, ``(api_key_id, created_at,
  id)`` for one key's, the order of the cursor.
* ``routing_decisions.created_at`` and ``generations.created_at`` are indexed: ``GET
  /v1/budget`` reads the decisions and images of the last minutes.
* ``cancelled`` joins the request states. The state is a plain string column with no CHECK
  constraint (``native_enum=False`` without ``create_constraint``), so no DDL is needed for it;
  the downgrade turns cancelled requests into failed ones with the reason.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYLESS = sa.text("api_key_id IS NULL")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("callback_secret", sa.String(length=100), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index("ix_api_keys_key_prefix", "api_keys", ["key_prefix"], unique=False)
    with op.batch_alter_table("generation_requests") as batch:
        batch.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
        batch.add_column(sa.Column("client_metadata", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("api_key_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_generation_requests_api_key_id_api_keys"), "api_keys", ["api_key_id"], ["id"]
        )
        batch.drop_constraint("uq_generation_requests_idempotency_key", type_="unique")
        batch.create_unique_constraint(
            "uq_generation_requests_owner_key", ["api_key_id", "idempotency_key"]
        )
    op.create_index(
        "uq_generation_requests_keyless_key",
        "generation_requests",
        ["idempotency_key"],
        unique=True,
        postgresql_where=KEYLESS,
        sqlite_where=KEYLESS,
    )
    op.create_index(
        "ix_generation_requests_created_at_id", "generation_requests", ["created_at", "id"]
    )
    op.create_index(
        "ix_generation_requests_api_key_created_at",
        "generation_requests",
        ["api_key_id", "created_at", "id"],
    )
    op.create_index("ix_routing_decisions_created_at", "routing_decisions", ["created_at"])
    op.create_index("ix_generations_created_at", "generations", ["created_at"])


def downgrade() -> None:
    op.execute(
        "UPDATE generation_requests SET status = 'failed', failure_reason = 'cancelled'"
        " WHERE status = 'cancelled'"
    )
    op.drop_index("ix_generations_created_at", table_name="generations")
    op.drop_index("ix_routing_decisions_created_at", table_name="routing_decisions")
    op.drop_index("ix_generation_requests_api_key_created_at", table_name="generation_requests")
    op.drop_index("ix_generation_requests_created_at_id", table_name="generation_requests")
    op.drop_index(
        "uq_generation_requests_keyless_key",
        table_name="generation_requests",
        postgresql_where=KEYLESS,
        sqlite_where=KEYLESS,
    )
    with op.batch_alter_table("generation_requests") as batch:
        batch.drop_constraint("uq_generation_requests_owner_key", type_="unique")
        batch.create_unique_constraint(
            "uq_generation_requests_idempotency_key", ["idempotency_key"]
        )
        batch.drop_constraint("fk_generation_requests_api_key_id_api_keys", type_="foreignkey")
        batch.drop_column("api_key_id")
        batch.drop_column("client_metadata")
        batch.drop_column("callback_url")
    op.drop_index("ix_api_keys_key_prefix", table_name="api_keys")
    op.drop_table("api_keys")
