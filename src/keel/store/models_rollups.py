"""The metric rollup table: per-time-bucket aggregates the dashboards read instead of raw traces.

One row per (grain, bucket, project, dimension, member): ``grain`` is the bucket width in seconds
(60, 3600 or 86400: minute, hour and day rows are all kept), ``bucket`` the bucket's start in epoch
seconds, ``dim`` one of ``all`` (member ``""``), ``model``, ``prompt`` (member ``name@version``),
``tag``, ``user`` or ``session`` (those two many-valued dims at hour and day grain only). Empty
strings stand for "none" so the natural key can be the primary key on both dialects.
Latency is kept as a fixed log-scale histogram (``h00``..``h39``), so percentiles are approximate.

Scores have their own table, ``score_rollups``: per (grain, bucket, project, score name, data type,
dim, member, label), the count, the count and sum of values and, on ``all`` rows, their min and max.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Index, Integer, PrimaryKeyConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from keel.store.models import Base

__all__ = ["HIST_BUCKETS", "MetricRollup", "ScoreRollup"]

# Latency histogram: bucket 0 is [0, 1 ms); bucket k (1..38) is [2^((k-1)/2), 2^(k/2)) ms; bucket 39 is >= 2^19 ms.
HIST_BUCKETS = 40


class MetricRollup(Base):
    """Aggregates of traces (requests) per time bucket and per dimension member."""

    __tablename__ = "metric_rollups"
    # dim first: a query reads one dim's rows of a grain's bucket range, a contiguous key range (and
    # on SQLite the rows themselves, WITHOUT ROWID: no lookup per row)
    __table_args__ = (
        PrimaryKeyConstraint("dim", "grain", "bucket", "project_id", "member"),
        # the busiest users' or sessions' rows of a range, without reading every member's
        Index("ix_metric_rollups_member", "dim", "member", "grain", "bucket"),
        {"sqlite_with_rowid": False},
    )

    grain: Mapped[int] = mapped_column(Integer, autoincrement=False)
    bucket: Mapped[int] = mapped_column(BigInteger, autoincrement=False)
    project_id: Mapped[str] = mapped_column(String(64))
    dim: Mapped[str] = mapped_column(String(16))
    member: Mapped[str] = mapped_column(String(256))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_sum_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_sum_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_count: Mapped[int] = mapped_column(BigInteger, default=0)


# The histogram columns h00..h39, declared in a loop rather than written out forty times.
for _k in range(HIST_BUCKETS):
    setattr(MetricRollup, f"h{_k:02d}", mapped_column(f"h{_k:02d}", BigInteger, default=0, nullable=False))


class ScoreRollup(Base):
    """Aggregates of scores per time bucket (of their creation), score name and dimension member.

    ``dim`` is ``all`` (member ``""``; ``label`` is the categorical label, ``""`` for the others),
    ``model`` (the scored trace's model) or ``prompt`` (its ``name@version``); those two have
    label ``""``. ``vmin``/``vmax`` are kept on ``all`` rows only (NULL elsewhere).
    """

    __tablename__ = "score_rollups"
    __table_args__ = (
        PrimaryKeyConstraint("dim", "grain", "bucket", "project_id", "name", "data_type", "member", "label"),
        {"sqlite_with_rowid": False},
    )

    grain: Mapped[int] = mapped_column(Integer, autoincrement=False)
    bucket: Mapped[int] = mapped_column(BigInteger, autoincrement=False)
    project_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    data_type: Mapped[str] = mapped_column(String(16))
    dim: Mapped[str] = mapped_column(String(16))
    member: Mapped[str] = mapped_column(String(256))
    label: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(BigInteger, default=0)  # scores
    nv: Mapped[int] = mapped_column(BigInteger, default=0)  # scores with a value (numeric, boolean)
    total: Mapped[float] = mapped_column(Float, default=0.0)  # sum of the values
    vmin: Mapped[float | None] = mapped_column(Float, nullable=True)
    vmax: Mapped[float | None] = mapped_column(Float, nullable=True)
