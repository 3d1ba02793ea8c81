"""dashboards: metric rollups (per minute, hour and day; per project and model, prompt version, tag,
user or session), score rollups, and trace_tags.start_time (the tag filter's newest-first index)

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

HIST_BUCKETS = 40  # keel.store.models_rollups.HIST_BUCKETS at this revision


def upgrade() -> None:
    op.create_table(
        "metric_rollups",
        sa.Column("grain", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("bucket", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("dim", sa.String(length=16), nullable=False),
        sa.Column("member", sa.String(length=256), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("latency_sum_ms", sa.Float(), nullable=False),
        sa.Column("ttft_sum_ms", sa.Float(), nullable=False),
        sa.Column("ttft_count", sa.BigInteger(), nullable=False),
        *(sa.Column(f"h{k:02d}", sa.BigInteger(), nullable=False) for k in range(HIST_BUCKETS)),
        sa.PrimaryKeyConstraint("dim", "grain", "bucket", "project_id", "member"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "score_rollups",
        sa.Column("grain", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("bucket", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("data_type", sa.String(length=16), nullable=False),
        sa.Column("dim", sa.String(length=16), nullable=False),
        sa.Column("member", sa.String(length=256), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("nv", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("vmin", sa.Float(), nullable=True),
        sa.Column("vmax", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint(
            "dim", "grain", "bucket", "project_id", "name", "data_type", "member", "label"
        ),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_metric_rollups_member", "metric_rollups", ["dim", "member", "grain", "bucket"])
    # TTFT on the trace summary: per-user and per-session numbers from the traces table need no join
    with op.batch_alter_table("traces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ttft_sum_ms", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("ttft_count", sa.Integer(), nullable=True))
    ttft = "FROM spans WHERE spans.trace_id = traces.trace_id AND spans.kind = 'llm' AND spans.ttft_ms IS NOT NULL"
    op.execute(
        f"UPDATE traces SET ttft_sum_ms = (SELECT SUM(ttft_ms) {ttft}), ttft_count = (SELECT COUNT(*) {ttft}) "
        f"WHERE EXISTS (SELECT 1 {ttft})"
    )
    # the tag filter walks (tag, start_time, trace_id) newest first: a copy of the trace's start time
    op.add_column("trace_tags", sa.Column("start_time", sa.DateTime(), nullable=True))
    op.execute("DELETE FROM trace_tags WHERE trace_id NOT IN (SELECT trace_id FROM traces)")
    op.execute(
        "UPDATE trace_tags SET start_time = "
        "(SELECT traces.start_time FROM traces WHERE traces.trace_id = trace_tags.trace_id)"
    )
    with op.batch_alter_table("trace_tags", schema=None) as batch_op:
        batch_op.alter_column("start_time", existing_type=sa.DateTime(), nullable=False)
        batch_op.drop_index("ix_trace_tags_tag")
        batch_op.create_index("ix_trace_tags_tag_start", ["tag", "start_time", "trace_id"], unique=True)
    # traces and scores written before this revision: fill their rollups (a no-op on a fresh database)
    from keel.store.rollups import rebuild_rollups
    from keel.store.score_rollups import rebuild_score_rollups

    rebuild_rollups(op.get_bind())
    rebuild_score_rollups(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("traces", schema=None) as batch_op:
        batch_op.drop_column("ttft_count")
        batch_op.drop_column("ttft_sum_ms")
    with op.batch_alter_table("trace_tags", schema=None) as batch_op:
        batch_op.drop_index("ix_trace_tags_tag_start")
        batch_op.create_index("ix_trace_tags_tag", ["tag", "trace_id"], unique=False)
        batch_op.drop_column("start_time")
    op.drop_table("score_rollups")
    op.drop_table("metric_rollups")
