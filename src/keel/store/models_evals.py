"""Tables of the evaluation core: versioned datasets and their items, eval runs and their results.

Dataset versions are cheap: an item row is immutable and carries the dataset version that added
it and (once replaced or deleted) the version that removed it, so "the items of version v" is one
indexed range query and old runs keep pointing at exactly the data they were scored on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from keel.store.models import Base, BigIntPK, JSONVariant

__all__ = ["EvalDataset", "EvalDatasetItem", "EvalResult", "EvalRun"]


class EvalDataset(Base):
    """A named dataset in a project; ``version`` is bumped by every change to its items."""

    __tablename__ = "eval_datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ux_eval_datasets_project_name", "project_id", "name", unique=True),)


class EvalDatasetItem(Base):
    """One immutable item version: live from ``version_added`` until ``version_removed`` (exclusive)."""

    __tablename__ = "eval_dataset_items"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("eval_datasets.id", ondelete="CASCADE"))
    item_id: Mapped[str] = mapped_column(String(64))  # stable across versions; runs pair items by it
    version_added: Mapped[int] = mapped_column(Integer)
    version_removed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input: Mapped[Any] = mapped_column(JSONVariant, nullable=True)
    expected: Mapped[Any] = mapped_column(JSONVariant, nullable=True)
    contexts: Mapped[list[str] | None] = mapped_column(JSONVariant, nullable=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONVariant, nullable=True)
    source_trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_eval_items_dataset_item", "dataset_id", "item_id"),
        Index("ix_eval_items_dataset_added", "dataset_id", "version_added"),
    )


class EvalRun(Base):
    """One execution of a suite: its variants (prompt x model), summary, cost and status."""

    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64))
    suite: Mapped[str] = mapped_column(String(200))
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    dataset_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    dataset_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # running | completed | failed
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    result_count: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        Index("ix_eval_runs_project_created", "project_id", "created_at"),
        Index("ix_eval_runs_label_created", "label", "created_at"),
    )


class EvalResult(Base):
    """One output of one variant on one item (one repeat), with every scorer's verdict."""

    __tablename__ = "eval_results"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    variant: Mapped[str] = mapped_column(String(200))
    item_id: Mapped[str] = mapped_column(String(64))
    repeat: Mapped[int] = mapped_column(Integer, default=0)
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)

    __table_args__ = (Index("ix_eval_results_run_variant_item", "run_id", "variant", "item_id"),)
