"""teams, key team/user/limits, team on spans and traces

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "limits",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_teams_project_id"), ["project_id"], unique=False)
        batch_op.create_index("ux_teams_project_name", ["project_id", "name"], unique=True)

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("end_user", sa.String(length=256), nullable=True))
        batch_op.add_column(
            sa.Column(
                "limits",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.create_index(batch_op.f("ix_api_keys_team_id"), ["team_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_api_keys_team_id_teams", "teams", ["team_id"], ["id"], ondelete="SET NULL"
        )

    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "limits",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )

    with op.batch_alter_table("spans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team_id", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_spans_start", ["start_time"], unique=False)

    with op.batch_alter_table("traces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("traces", schema=None) as batch_op:
        batch_op.drop_column("team_id")

    with op.batch_alter_table("spans", schema=None) as batch_op:
        batch_op.drop_index("ix_spans_start")
        batch_op.drop_column("team_id")

    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("limits")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint("fk_api_keys_team_id_teams", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_api_keys_team_id"))
        batch_op.drop_column("limits")
        batch_op.drop_column("end_user")
        batch_op.drop_column("team_id")

    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_index("ux_teams_project_name")
        batch_op.drop_index(batch_op.f("ix_teams_project_id"))

    op.drop_table("teams")
