"""The metric rollup table: per-time-bucket aggregates the dashboards read instead of raw traces.

One row per (grain, bucket, project, dimension, member): ``grain`` is the bucket width in seconds
(60, 3600 or 86400: minute, hour and day rows are all kept), ``bucket`` the bucket's start in epoch
seconds, ``dim`` one of ``all`` (member ``""``), ``model``, ``prompt`` (member ``name@version``) or
``tag``. Empty strings stand for "none" so the natural key can be the primary key on both dialects.
Latency is kept as a fixed log-scale histogram (``h00``..``h39``), so percentiles are approximate.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from keel.store.models import Base

__all__ = ["HIST_BUCKETS", "MetricRollup"]

# Latency histogram: bucket 0 is [0, 1 ms); bucket k (1..38) is [2^((k-1)/2), 2^(k/2)) ms; bucket 39 is >= 2^19 ms.
HIST_BUCKETS = 40


class MetricRollup(Base):
    """Aggregates of traces (requests) per time bucket and per dimension member."""

    __tablename__ = "metric_rollups"

    grain: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    dim: Mapped[str] = mapped_column(String(16), primary_key=True)
    member: Mapped[str] = mapped_column(String(256), primary_key=True)
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
