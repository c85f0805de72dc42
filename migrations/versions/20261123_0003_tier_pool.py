"""a pool of tiers: tiers are names, decisions record every tier's prediction

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 19:10:00

Two-tier rows are kept, converted:

* ``predicted_prs`` becomes ``predicted_quality`` ``{"edge": 0.5, "cloud": 1 - PRS}``, the
  scores under which the policy's rule argmax(quality - lambda * cost) is the PRS < alpha rule
  (routing/policy.py);
* ``alpha`` becomes ``tradeoff`` = (1/2 - alpha) / (cost_cloud - cost_edge), with the costs of
  the default pool (1 and 10), the lambda that makes the same decisions;
* ``wants_cloud`` becomes ``wanted_tier``, ``explore`` the list ``explored`` (the other tier),
  and ``spent`` is what the cloud-ratio bucket charged in cost units (9 per cloud image);
* decisions can record escalations (a tier generated again one step up when the answer
  scored below a threshold): none for the rows already there;
* ``training_pairs`` goes: both tiers' metric vectors are in ``quality_scores``, per (request,
  tier), and pairs (or any subset of a pool) are built from them at training time.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIER_LENGTH = 32
COST_GAP = 9.0  # cost_cloud - cost_edge of the default pool
OLD_TIER = sa.Enum("edge", "cloud", name="tier", native_enum=False, length=16)
TIER_TABLES = ("generations", "quality_scores")


def _postgres() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    # The dialect's JSON builders (the demo's SQLite has its own names).
    obj, arr = (
        ("json_build_object", "json_build_array")
        if _postgres()
        else (
            "json_object",
            "json_array",
        )
    )
    empty = f"{arr}()"
    with op.batch_alter_table("generation_requests") as batch:
        batch.alter_column("steps", existing_type=sa.Integer(), nullable=True)
    with op.batch_alter_table("routing_decisions") as batch:
        batch.add_column(sa.Column("predicted_quality", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("tradeoff", sa.Float(), nullable=True))
        batch.add_column(sa.Column("wanted_tier", sa.String(TIER_LENGTH), nullable=True))
        batch.add_column(sa.Column("explored", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("spent", sa.Float(), nullable=True))
        batch.add_column(sa.Column("escalating_to", sa.String(TIER_LENGTH), nullable=True))
        batch.add_column(sa.Column("escalations", sa.JSON(), nullable=True))
    other = "CASE WHEN tier = 'edge' THEN 'cloud' ELSE 'edge' END"
    op.execute(
        "UPDATE routing_decisions SET "
        f"predicted_quality = {obj}('edge', 0.5, 'cloud', 1.0 - predicted_prs), "
        f"tradeoff = (0.5 - alpha) / {COST_GAP}, "
        "wanted_tier = CASE WHEN wants_cloud THEN 'cloud' ELSE 'edge' END, "
        f"explored = CASE WHEN explore THEN {arr}({other}) ELSE {empty} END, "
        f"spent = CASE WHEN tier = 'cloud' OR explore THEN {COST_GAP} ELSE 0.0 END, "
        f"escalations = {empty}"
    )
    with op.batch_alter_table("routing_decisions") as batch:
        for column, kind in (
            ("predicted_quality", sa.JSON()),
            ("tradeoff", sa.Float()),
            ("wanted_tier", sa.String(TIER_LENGTH)),
            ("explored", sa.JSON()),
            ("spent", sa.Float()),
            ("escalations", sa.JSON()),
        ):
            batch.alter_column(column, existing_type=kind, nullable=False)
        for column in ("predicted_prs", "alpha", "wants_cloud", "explore"):
            batch.drop_column(column)
        for column, nullable in (("tier", False), ("rerouted_from", True)):
            batch.alter_column(
                column,
                existing_type=OLD_TIER,
                type_=sa.String(TIER_LENGTH),
                existing_nullable=nullable,
            )
    for table in TIER_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                "tier", existing_type=OLD_TIER, type_=sa.String(TIER_LENGTH), nullable=False
            )
    op.drop_table("training_pairs")


def downgrade() -> None:
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
    score = (
        "{alias}.scores -> 'values'" if _postgres() else "json_extract({alias}.scores, '$.values')"
    )
    op.execute(
        "INSERT INTO training_pairs (request_id, metrics_version, edge_scores, cloud_scores) "
        f"SELECT e.request_id, e.metrics_version, {score.format(alias='e')}, "
        f"{score.format(alias='c')} FROM quality_scores e JOIN quality_scores c "
        "ON c.request_id = e.request_id AND c.metrics_version = e.metrics_version "
        "WHERE e.tier = 'edge' AND c.tier = 'cloud'"
    )
    for table in TIER_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                "tier", existing_type=sa.String(TIER_LENGTH), type_=OLD_TIER, nullable=False
            )
    with op.batch_alter_table("routing_decisions") as batch:
        batch.add_column(sa.Column("predicted_prs", sa.Float(), nullable=True))
        batch.add_column(sa.Column("alpha", sa.Float(), nullable=True))
        batch.add_column(sa.Column("wants_cloud", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("explore", sa.Boolean(), nullable=True))
    cloud_quality = (
        "CAST(predicted_quality ->> 'cloud' AS FLOAT)"
        if _postgres()
        else "json_extract(predicted_quality, '$.cloud')"
    )
    op.execute(
        "UPDATE routing_decisions SET "
        f"predicted_prs = 1.0 - {cloud_quality}, "
        f"alpha = 0.5 - tradeoff * {COST_GAP}, "
        "wants_cloud = (wanted_tier = 'cloud'), "
        "explore = (json_array_length(explored) > 0)"
    )
    with op.batch_alter_table("routing_decisions") as batch:
        for column, kind in (
            ("predicted_prs", sa.Float()),
            ("alpha", sa.Float()),
            ("wants_cloud", sa.Boolean()),
            ("explore", sa.Boolean()),
        ):
            batch.alter_column(column, existing_type=kind, nullable=False)
        for column in (
            "predicted_quality",
            "tradeoff",
            "wanted_tier",
            "explored",
            "spent",
            "escalating_to",
            "escalations",
        ):
            batch.drop_column(column)
        for column, nullable in (("tier", False), ("rerouted_from", True)):
            batch.alter_column(
                column,
                existing_type=sa.String(TIER_LENGTH),
                type_=OLD_TIER,
                existing_nullable=nullable,
            )
    with op.batch_alter_table("generation_requests") as batch:
        batch.alter_column("steps", existing_type=sa.Integer(), nullable=False)
