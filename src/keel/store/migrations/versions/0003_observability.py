"""observability: scores; prompt name and version on spans and traces; key kinds; project retention

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scores",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("trace_id", sa.String(length=32), nullable=False),
        sa.Column("span_id", sa.String(length=16), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("data_type", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("string_value", sa.String(length=200), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("author", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_scores_trace", "scores", ["trace_id"])
    op.create_index("ix_scores_project_name_created", "scores", ["project_id", "name", "created_at"])
    op.create_index("ix_scores_project_created", "scores", ["project_id", "created_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="secret"))
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("retention_days", sa.Float(), nullable=True))
    for table in ("traces", "spans"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("prompt_name", sa.String(length=200), nullable=True))
            batch.add_column(sa.Column("prompt_version", sa.Integer(), nullable=True))
    op.create_index("ix_traces_prompt_start", "traces", ["prompt_name", "prompt_version", "start_time"])


def downgrade() -> None:
    op.drop_index("ix_traces_prompt_start", table_name="traces")
    for table in ("traces", "spans"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("prompt_version")
            batch.drop_column("prompt_name")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("retention_days")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("kind")
    op.drop_index("ix_scores_project_created", table_name="scores")
    op.drop_index("ix_scores_project_name_created", table_name="scores")
    op.drop_index("ix_scores_trace", table_name="scores")
    op.drop_table("scores")
