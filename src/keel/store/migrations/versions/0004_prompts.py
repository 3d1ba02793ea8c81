"""prompt registry: prompts, versions, labels, label history (filled in by the prompt registry work)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSONVariant = sa.JSON().with_variant(JSONB(), "postgresql")
BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("protected_labels", JSONVariant, nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_prompts_project_name", "prompts", ["project_id", "name"], unique=True)
    op.create_table(
        "prompt_versions",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("prompt_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("template", JSONVariant, nullable=False),
        sa.Column("variables", JSONVariant, nullable=True),
        sa.Column("config", JSONVariant, nullable=True),
        sa.Column("metadata", JSONVariant, nullable=True),
        sa.Column("commit_message", sa.Text(), nullable=True),
        sa.Column("author", sa.String(length=256), nullable=True),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ux_prompt_versions_prompt_version", "prompt_versions", ["prompt_id", "version"], unique=True
    )
    op.create_table(
        "prompt_labels",
        sa.Column("prompt_id", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("split", JSONVariant, nullable=True),
        sa.Column("eval_run", sa.String(length=200), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("prompt_id", "label"),
    )
    op.create_table(
        "prompt_events",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("prompt_id", sa.String(length=64), nullable=False),
        sa.Column("prompt_name", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("detail", JSONVariant, nullable=True),
        sa.Column("actor", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_prompt_events_prompt_created", "prompt_events", ["prompt_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_prompt_events_prompt_created", table_name="prompt_events")
    op.drop_table("prompt_events")
    op.drop_table("prompt_labels")
    op.drop_index("ux_prompt_versions_prompt_version", table_name="prompt_versions")
    op.drop_table("prompt_versions")
    op.drop_index("ux_prompts_project_name", table_name="prompts")
    op.drop_table("prompts")
