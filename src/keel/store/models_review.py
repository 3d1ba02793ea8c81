"""Tables of online evaluation and human review: online rules, annotation queues and their items.

An online rule samples a share of new production traces that match its filter and scores them in
the background; ``watermark`` is the last span row id the rule has looked at (advanced with a
compare-and-set, so with several replicas each span is claimed by exactly one of them).  An
annotation queue holds traces for people to score; reviewing an item writes a ``human`` score.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from keel.store.models import Base, BigIntPK, JSONVariant

__all__ = ["AnnotationItem", "AnnotationQueue", "OnlineRule"]


class OnlineRule(Base):
    """Score ``sample_rate`` of new traces matching ``filter`` with ``scorers`` (and/or queue them)."""

    __tablename__ = "online_rules"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None: every project
    name: Mapped[str] = mapped_column(String(200))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    filter: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    sample_rate: Mapped[float] = mapped_column(Float)
    scorers: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONVariant, nullable=True)
    queue_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # sampled traces go here too
    watermark: Mapped[int] = mapped_column(BigInteger, default=0)
    matched: Mapped[int] = mapped_column(Integer, default=0)
    sampled: Mapped[int] = mapped_column(Integer, default=0)
    scored: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ix_online_rules_project", "project_id"),)


class AnnotationQueue(Base):
    """A review queue: what reviewers score (``score_name`` on a 1-5 scale or yes/no)."""

    __tablename__ = "annotation_queues"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    score_name: Mapped[str] = mapped_column(String(200))
    score_type: Mapped[str] = mapped_column(String(16))  # scale (1-5) | boolean
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ix_annotation_queues_project", "project_id", "created_at"),)


class AnnotationItem(Base):
    """One trace in a queue: pending until reviewed (or skipped)."""

    __tablename__ = "annotation_items"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    queue_id: Mapped[str] = mapped_column(ForeignKey("annotation_queues.id", ondelete="CASCADE"))
    trace_id: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # pending | done | skipped
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewer: Mapped[str | None] = mapped_column(String(256), nullable=True)
    score_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source: Mapped[str] = mapped_column(String(64))  # manual | rule id that sampled it
    created_at: Mapped[datetime] = mapped_column(DateTime)
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        Index("ux_annotation_items_queue_trace", "queue_id", "trace_id", unique=True),
        Index("ix_annotation_items_queue_status", "queue_id", "status", "id"),
    )
