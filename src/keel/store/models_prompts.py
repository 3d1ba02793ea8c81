"""Tables of the prompt registry: prompts, their immutable versions, labels, and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from keel.store.models import Base, BigIntPK, JSONVariant

__all__ = ["Prompt", "PromptEvent", "PromptLabel", "PromptVersion"]


class Prompt(Base):
    """A named prompt; its content lives in versions, labels point at them."""

    __tablename__ = "prompts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # prompts are per project: keys see, and the gateway resolves, their own project's prompts
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(16))  # text | chat
    latest_version: Mapped[int] = mapped_column(Integer, default=0)
    protected_labels: Mapped[list[str] | None] = mapped_column(JSONVariant, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ux_prompts_project_name", "project_id", "name", unique=True),)


class PromptVersion(Base):
    """One immutable version: template, declared variables, model config and who made it why."""

    __tablename__ = "prompt_versions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    template: Mapped[Any] = mapped_column(JSONVariant)  # text: a string; chat: a list of messages
    variables: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONVariant, nullable=True)
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONVariant, nullable=True)
    commit_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    author: Mapped[str | None] = mapped_column(String(256), nullable=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ux_prompt_versions_prompt_version", "prompt_id", "version", unique=True),)


class PromptLabel(Base):
    """A label (production, staging, ...) pointing at one version, or splitting traffic between several."""

    __tablename__ = "prompt_labels"

    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)  # the primary version (most traffic)
    split: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSONVariant, nullable=True
    )  # [{version, weight}]
    eval_run: Mapped[str | None] = mapped_column(String(200), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    updated_by: Mapped[str | None] = mapped_column(String(256), nullable=True)


class PromptEvent(Base):
    """Audit log: every version created, label moved and rollback, with actor and time."""

    __tablename__ = "prompt_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    prompt_id: Mapped[str] = mapped_column(String(64))
    prompt_name: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(32))  # create | version | label | rollback | unlabel | protect
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    actor: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ix_prompt_events_prompt_created", "prompt_id", "created_at"),)
