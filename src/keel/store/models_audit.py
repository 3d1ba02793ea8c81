"""The audit log: append-only, hash-chained records of administrative actions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from keel.store.models import Base, JSONVariant

__all__ = ["AuditHead", "AuditRecord"]

BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class AuditRecord(Base):
    """One administrative action. ``hash`` = sha256(prev_hash + canonical JSON of the record's fields)."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(DateTime)
    actor: Mapped[str] = mapped_column(String(256))  # "master", "key:<id>", "user:<name>", "cli"
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64))  # e.g. key.create, key.revoke, prompt.label
    target: Mapped[str | None] = mapped_column(String(256), nullable=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONVariant, nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_audit_at", "at"),
        Index("ix_audit_project_at", "project_id", "at"),
        Index("ix_audit_action_at", "action", "at"),
    )


class AuditHead(Base):
    """The chain's head (one row): appends lock it, so concurrent writers extend one chain."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
