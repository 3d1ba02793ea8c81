"""trace explorer: full-text search over span input/output and further filter indexes

SQLite: an FTS5 table over trace_text (external content; the trace writer fills both).
PostgreSQL: a GIN index on trace_text's tsvector.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TRACE_INDEXES = {
    "ix_traces_session_start": ["session_id", "start_time"],
    "ix_traces_name_start": ["name", "start_time"],
    "ix_traces_key_start": ["key_id", "start_time"],
    "ix_traces_team_start": ["team_id", "start_time"],
    "ix_traces_provider_start": ["provider", "start_time"],
    "ix_traces_latency": ["latency_ms"],
    "ix_traces_cost": ["cost_usd"],
    # replaces ix_traces_user_start (user_id, start_time): covering for the per-user totals
    "ix_traces_user_cover": [
        "user_id",
        "start_time",
        "project_id",
        "session_id",
        "status",
        "model",
        "input_tokens",
        "output_tokens",
        "cost_usd",
    ],
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_index("ix_traces_session", table_name="traces")  # superseded by (session_id, start_time)
    op.drop_index("ix_traces_user_start", table_name="traces")  # superseded by ix_traces_user_cover
    for name, cols in _TRACE_INDEXES.items():
        op.create_index(name, "traces", cols)
    op.create_table(
        "trace_text",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("trace_id", sa.String(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
    )
    op.create_index("ix_trace_text_trace", "trace_text", ["trace_id"])
    if dialect == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE trace_fts USING fts5(body, content='trace_text', content_rowid='id', detail=none, "
            "tokenize='unicode61 remove_diacritics 2')"
        )
    elif dialect == "postgresql":
        op.execute(
            "CREATE INDEX ix_trace_text_tsv ON trace_text USING gin (to_tsvector('simple'::regconfig, body))"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TABLE IF EXISTS trace_fts")
    elif dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_trace_text_tsv")
    op.drop_index("ix_trace_text_trace", table_name="trace_text")
    op.drop_table("trace_text")
    for name in _TRACE_INDEXES:
        op.drop_index(name, table_name="traces")
    op.create_index("ix_traces_user_start", "traces", ["user_id", "start_time"])
    op.create_index("ix_traces_session", "traces", ["session_id"])
