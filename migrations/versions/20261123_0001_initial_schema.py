"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 09:23:48.065829
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "generation_requests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("guidance_scale", sa.Float(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "routed",
                "done",
                "failed",
                name="request_status",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generation_requests")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_generation_requests_idempotency_key")),
    )
    op.create_index(
        "ix_generation_requests_status_updated",
        "generation_requests",
        ["status", "updated_at"],
        unique=False,
    )
    op.create_table(
        "router_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("n_train_pairs", sa.Integer(), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_router_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_router_versions_version")),
    )
    op.create_index(
        "uq_router_versions_one_active",
        "router_versions",
        ["is_active"],
        unique=True,
        postgresql_where=sa.text("is_active"),
        sqlite_where=sa.text("is_active"),
    )
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column(
            "tier",
            sa.Enum("edge", "cloud", name="tier", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("image_path", sa.String(length=500), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["generation_requests.id"],
            name=op.f("fk_generations_request_id_generation_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generations")),
        sa.UniqueConstraint("request_id", "tier", name="uq_generations_request_tier"),
    )
    op.create_table(
        "routing_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("router_version", sa.String(length=200), nullable=False),
        sa.Column("predicted_prs", sa.Float(), nullable=False),
        sa.Column("predicted_metrics", sa.JSON(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("wants_cloud", sa.Boolean(), nullable=False),
        sa.Column(
            "tier",
            sa.Enum("edge", "cloud", name="tier", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("explore", sa.Boolean(), nullable=False),
        sa.Column("budget_reason", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["generation_requests.id"],
            name=op.f("fk_routing_decisions_request_id_generation_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_decisions")),
        sa.UniqueConstraint("request_id", name=op.f("uq_routing_decisions_request_id")),
    )
    op.create_table(
        "training_pairs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("metrics_version", sa.String(length=32), nullable=False),
        sa.Column("edge_scores", sa.JSON(), nullable=False),
        sa.Column("cloud_scores", sa.JSON(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["generation_requests.id"],
            name=op.f("fk_training_pairs_request_id_generation_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_pairs")),
        sa.UniqueConstraint("request_id", name=op.f("uq_training_pairs_request_id")),
    )
    op.create_table(
        "quality_scores",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column(
            "tier",
            sa.Enum("edge", "cloud", name="tier", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("metrics_version", sa.String(length=32), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("mean_score", sa.Float(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name=op.f("fk_quality_scores_generation_id_generations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["generation_requests.id"],
            name=op.f("fk_quality_scores_request_id_generation_requests"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quality_scores")),
        sa.UniqueConstraint(
            "generation_id", "metrics_version", name="uq_quality_scores_generation"
        ),
    )
    op.create_index("ix_quality_scores_request", "quality_scores", ["request_id"], unique=False)


def downgrade() -> None:

    op.drop_index("ix_quality_scores_request", table_name="quality_scores")
    op.drop_table("quality_scores")
    op.drop_table("training_pairs")
    op.drop_table("routing_decisions")
    op.drop_table("generations")
    op.drop_index(
        "uq_router_versions_one_active",
        table_name="router_versions",
        postgresql_where=sa.text("is_active"),
        sqlite_where=sa.text("is_active"),
    )
    op.drop_table("router_versions")
    op.drop_index("ix_generation_requests_status_updated", table_name="generation_requests")
    op.drop_table("generation_requests")
