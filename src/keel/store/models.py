"""SQLAlchemy 2 models: one schema for SQLite and PostgreSQL (JSON there is JSONB)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["ApiKey", "Base", "Project", "Score", "Span", "Team", "Trace", "TraceTag"]

# JSON on SQLite, JSONB on PostgreSQL.
JSONVariant = JSON().with_variant(JSONB(), "postgresql")
# Integer primary keys autoincrement on both dialects.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    # days of traces kept for this project; None follows the global retention_days, 0 keeps forever
    retention_days: Mapped[float | None] = mapped_column(Float, nullable=True)


class Team(Base):
    """A team inside a project: keys may belong to one; budgets and limits apply to all its keys."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ux_teams_project_name", "project_id", "name", unique=True),)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(32))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSONVariant, nullable=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONVariant, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    team_id: Mapped[str | None] = mapped_column(
        ForeignKey("teams.id", ondelete="SET NULL", name="fk_api_keys_team_id_teams"),
        nullable=True,
        index=True,
    )
    end_user: Mapped[str | None] = mapped_column(String(256), nullable=True)
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    # "secret" (sk-keel-: gateway and API) or "public" (pk-keel-: end-user feedback only, safe in a browser)
    kind: Mapped[str] = mapped_column(String(16), default="secret", server_default="secret")
    # what the key may do (keel.types.SCOPES); NULL: the default gateway, ingest, read (migration 0011)
    scopes: Mapped[list[str] | None] = mapped_column(JSONVariant, nullable=True)


class Trace(Base):
    """Summary of a trace, maintained by the trace writer from the trace's spans."""

    __tablename__ = "traces"

    trace_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    team_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    start_time: Mapped[datetime] = mapped_column(DateTime)
    end_time: Mapped[datetime] = mapped_column(DateTime)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    tags: Mapped[list[str] | None] = mapped_column(JSONVariant, nullable=True)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    span_count: Mapped[int] = mapped_column(Integer, default=0)
    prompt_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # time to first token of the trace's streamed LLM spans (sum and count; NULL: none), for dashboards
    ttft_sum_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_count: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        Index("ix_traces_project_start", "project_id", "start_time"),
        Index("ix_traces_start", "start_time"),
        Index("ix_traces_model_start", "model", "start_time"),
        Index("ix_traces_status_start", "status", "start_time"),
        Index("ix_traces_prompt_start", "prompt_name", "prompt_version", "start_time"),
        # trace explorer filters (migration 0005): each equality filter keeps newest-first order
        Index("ix_traces_session_start", "session_id", "start_time"),
        # the user filter, and covering for the per-user totals of /api/users (an index-only scan)
        Index(
            "ix_traces_user_cover",
            "user_id",
            "start_time",
            "project_id",
            "session_id",
            "status",
            "model",
            "input_tokens",
            "output_tokens",
            "cost_usd",
        ),
        Index("ix_traces_name_start", "name", "start_time"),
        Index("ix_traces_key_start", "key_id", "start_time"),
        Index("ix_traces_team_start", "team_id", "start_time"),
        Index("ix_traces_provider_start", "provider", "start_time"),
        Index("ix_traces_latency", "latency_ms"),
        Index("ix_traces_cost", "cost_usd"),
    )


class TraceTag(Base):
    """One tag of a trace: a row per tag so the tag filter is an index lookup on both dialects."""

    __tablename__ = "trace_tags"

    trace_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tag: Mapped[str] = mapped_column(String(200), primary_key=True)
    # the trace's start_time, kept equal by the writer: the tag filter's newest-first page is an index walk
    start_time: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ix_trace_tags_tag_start", "tag", "start_time", "trace_id", unique=True),)


class Span(Base):
    """A finished span; immutable once written."""

    __tablename__ = "spans"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    trace_id: Mapped[str] = mapped_column(String(32))
    span_id: Mapped[str] = mapped_column(String(16))
    parent_span_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    team_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    start_time: Mapped[datetime] = mapped_column(DateTime)
    end_time: Mapped[datetime] = mapped_column(DateTime)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    requested_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    input_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    priced: Mapped[bool] = mapped_column(Boolean, default=True)
    user_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    prompt_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    input: Mapped[Any] = mapped_column(JSONVariant, nullable=True)
    output: Mapped[Any] = mapped_column(JSONVariant, nullable=True)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)

    __table_args__ = (
        Index("ux_spans_trace_span", "trace_id", "span_id", unique=True),
        Index("ix_spans_project_start", "project_id", "start_time"),
        Index("ix_spans_start", "start_time"),
    )


class Score(Base):
    """A score on a trace or one of its spans: numeric, boolean or categorical, from a human, the API or an eval."""

    __tablename__ = "scores"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    trace_id: Mapped[str] = mapped_column(String(32))
    span_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    data_type: Mapped[str] = mapped_column(String(16))  # numeric | boolean | categorical
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # numeric; boolean as 0/1
    string_value: Mapped[str | None] = mapped_column(String(200), nullable=True)  # categorical label
    source: Mapped[str] = mapped_column(String(16))  # human | api | eval
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    author: Mapped[str | None] = mapped_column(String(256), nullable=True)  # key id, user or eval run
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_scores_trace", "trace_id"),
        Index("ix_scores_project_name_created", "project_id", "name", "created_at"),
        Index("ix_scores_project_created", "project_id", "created_at"),
    )
