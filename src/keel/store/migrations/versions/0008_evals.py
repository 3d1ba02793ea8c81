"""evaluation: datasets, items, runs, results, online rules, annotation queues (filled in by the evaluation work)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSONVariant = sa.JSON().with_variant(JSONB(), "postgresql")
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


# -- evaluation core: datasets, items, runs, results (keel.store.models_evals) --------------------


def _upgrade_core() -> None:
    op.create_table(
        "eval_datasets",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_eval_datasets_project_name", "eval_datasets", ["project_id", "name"], unique=True)
    op.create_table(
        "eval_dataset_items",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("item_id", sa.String(length=64), nullable=False),
        sa.Column("version_added", sa.Integer(), nullable=False),
        sa.Column("version_removed", sa.Integer(), nullable=True),
        sa.Column("input", JSONVariant, nullable=True),
        sa.Column("expected", JSONVariant, nullable=True),
        sa.Column("contexts", JSONVariant, nullable=True),
        sa.Column("metadata", JSONVariant, nullable=True),
        sa.Column("source_trace_id", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["eval_datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_eval_items_dataset_item", "eval_dataset_items", ["dataset_id", "item_id"])
    op.create_index("ix_eval_items_dataset_added", "eval_dataset_items", ["dataset_id", "version_added"])
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("suite", sa.String(length=200), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("dataset_id", sa.String(length=64), nullable=True),
        sa.Column("dataset_name", sa.String(length=200), nullable=True),
        sa.Column("dataset_version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("config", JSONVariant, nullable=True),
        sa.Column("summary", JSONVariant, nullable=True),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("result_count", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_eval_runs_project_created", "eval_runs", ["project_id", "created_at"])
    op.create_index("ix_eval_runs_label_created", "eval_runs", ["label", "created_at"])
    op.create_table(
        "eval_results",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=200), nullable=False),
        sa.Column("item_id", sa.String(length=64), nullable=False),
        sa.Column("repeat", sa.Integer(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("scores", JSONVariant, nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["eval_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_eval_results_run_variant_item", "eval_results", ["run_id", "variant", "item_id"])


def _downgrade_core() -> None:
    op.drop_index("ix_eval_results_run_variant_item", table_name="eval_results")
    op.drop_table("eval_results")
    op.drop_index("ix_eval_runs_label_created", table_name="eval_runs")
    op.drop_index("ix_eval_runs_project_created", table_name="eval_runs")
    op.drop_table("eval_runs")
    op.drop_index("ix_eval_items_dataset_added", table_name="eval_dataset_items")
    op.drop_index("ix_eval_items_dataset_item", table_name="eval_dataset_items")
    op.drop_table("eval_dataset_items")
    op.drop_index("ux_eval_datasets_project_name", table_name="eval_datasets")
    op.drop_table("eval_datasets")


# -- online evaluation rules and annotation queues (keel.store.models_review): added by that work --


def _upgrade_review() -> None:
    op.create_table(
        "online_rules",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("filter", JSONVariant, nullable=True),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("scorers", JSONVariant, nullable=True),
        sa.Column("queue_id", sa.String(length=64), nullable=True),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.Column("matched", sa.Integer(), nullable=False),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("scored", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_online_rules_project", "online_rules", ["project_id"])
    op.create_table(
        "annotation_queues",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("score_name", sa.String(length=200), nullable=False),
        sa.Column("score_type", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_annotation_queues_project", "annotation_queues", ["project_id", "created_at"])
    op.create_table(
        "annotation_items",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("queue_id", sa.String(length=64), nullable=False),
        sa.Column("trace_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(length=256), nullable=True),
        sa.Column("score_id", sa.String(length=64), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["queue_id"], ["annotation_queues.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ux_annotation_items_queue_trace", "annotation_items", ["queue_id", "trace_id"], unique=True
    )
    op.create_index("ix_annotation_items_queue_status", "annotation_items", ["queue_id", "status", "id"])


def _downgrade_review() -> None:
    op.drop_index("ix_annotation_items_queue_status", table_name="annotation_items")
    op.drop_index("ux_annotation_items_queue_trace", table_name="annotation_items")
    op.drop_table("annotation_items")
    op.drop_index("ix_annotation_queues_project", table_name="annotation_queues")
    op.drop_table("annotation_queues")
    op.drop_index("ix_online_rules_project", table_name="online_rules")
    op.drop_table("online_rules")


def upgrade() -> None:
    _upgrade_core()
    _upgrade_review()


def downgrade() -> None:
    _downgrade_review()
    _downgrade_core()
