"""Append-only, hash-chained audit records of administrative actions, and their verification.

Each record's ``hash`` is sha256 over the previous record's hash and the canonical JSON of the
record (sequence number, time, actor, project, action, target, details). Appends lock the single
``audit_head`` row first, so concurrent writers — several replicas included — extend one chain
without gaps. Database triggers refuse UPDATE and DELETE on ``audit_log``; :func:`verify` detects
what someone with the power to drop those triggers changed anyway: an edited field, a removed or
re-ordered record, a truncated tail.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, insert, select, update

from keel.store.models_audit import AuditHead, AuditRecord
from keel.store.repo import Store, iso, utcnow

__all__ = [
    "GENESIS",
    "Verification",
    "actor_of",
    "append",
    "digest",
    "list_records",
    "record",
    "record_config",
    "section_hash",
    "verify",
]

GENESIS = "0" * 64


def _canonical(
    seq: int,
    at: datetime,
    actor: str,
    project_id: str | None,
    action: str,
    target: str | None,
    details: Any,
) -> bytes:
    return orjson.dumps(
        {
            "seq": seq,
            "at": at.isoformat(timespec="microseconds"),
            "actor": actor,
            "project_id": project_id,
            "action": action,
            "target": target,
            "details": details,
        },
        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
    )


def digest(prev_hash: str, payload: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + payload).hexdigest()


def record(
    store: Store,
    *,
    actor: str,
    action: str,
    target: str | None = None,
    project_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one record to the chain (its own transaction) and return it."""
    with store.engine.begin() as conn:
        return append(conn, actor=actor, action=action, target=target, project_id=project_id, details=details)


def append(
    conn: Connection,
    *,
    actor: str,
    action: str,
    target: str | None = None,
    project_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one record inside the caller's transaction (so it commits or rolls back with the change)."""
    details = orjson.loads(orjson.dumps(details, option=orjson.OPT_NON_STR_KEYS)) if details else None
    at = utcnow()
    # the UPDATE takes the write lock first (SQLite: the database; PostgreSQL: the head row)
    conn.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq + 1))
    seq, prev = conn.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
    h = digest(prev, _canonical(seq, at, actor, project_id, action, target, details))
    conn.execute(
        insert(AuditRecord).values(
            seq=seq,
            at=at,
            actor=actor,
            project_id=project_id,
            action=action,
            target=target,
            details=details,
            prev_hash=prev,
            hash=h,
        )
    )
    conn.execute(update(AuditHead).where(AuditHead.id == 1).values(hash=h))
    return {
        "seq": seq,
        "at": iso(at),
        "actor": actor,
        "project_id": project_id,
        "action": action,
        "target": target,
        "details": details,
        "hash": h,
    }


@dataclass
class Verification:
    ok: bool
    checked: int
    head_seq: int
    first_bad_seq: int | None = None
    problem: str | None = None


def _rows(store: Store, batch: int = 5000) -> Iterator[Any]:
    last = 0
    with store.engine.connect() as conn:
        while True:
            rows = conn.execute(
                select(AuditRecord).where(AuditRecord.seq > last).order_by(AuditRecord.seq).limit(batch)
            ).all()
            if not rows:
                return
            yield from rows
            last = rows[-1].seq


def verify(store: Store) -> Verification:
    """Walk the whole chain; the first record whose content, link or position is wrong is reported."""
    with store.engine.connect() as conn:
        head_seq, head_hash = conn.execute(
            select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)
        ).one()
    prev, expected_seq, n = GENESIS, 1, 0
    for r in _rows(store):
        n += 1
        if r.seq != expected_seq:
            return Verification(False, n, head_seq, expected_seq, f"record {expected_seq} is missing")
        if r.prev_hash != prev:
            return Verification(False, n, head_seq, r.seq, "its link to the previous record is broken")
        payload = _canonical(r.seq, r.at, r.actor, r.project_id, r.action, r.target, r.details)
        if digest(prev, payload) != r.hash:
            return Verification(False, n, head_seq, r.seq, "its content does not match its hash")
        prev, expected_seq = r.hash, r.seq + 1
    if expected_seq - 1 != head_seq or prev != head_hash:
        return Verification(
            False,
            n,
            head_seq,
            expected_seq,
            f"the chain ends at {expected_seq - 1} but its head says {head_seq}",
        )
    return Verification(True, n, head_seq)


def list_records(
    store: Store,
    *,
    project_id: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    before_seq: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Newest first; page with ``before_seq`` = the last seq of the previous page."""
    stmt = select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(limit)
    if project_id is not None:
        stmt = stmt.where(AuditRecord.project_id == project_id)
    if action is not None:
        stmt = stmt.where(AuditRecord.action == action)
    if actor is not None:
        stmt = stmt.where(AuditRecord.actor == actor)
    if before_seq is not None:
        stmt = stmt.where(AuditRecord.seq < before_seq)
    with store.engine.connect() as conn:
        return [
            {
                "seq": r.seq,
                "at": iso(r.at),
                "actor": r.actor,
                "project_id": r.project_id,
                "action": r.action,
                "target": r.target,
                "details": r.details,
                "hash": r.hash,
            }
            for r in conn.execute(stmt)
        ]


def actor_of(principal: Any) -> str:
    """How a caller appears in the audit log: ``master``, ``key:<id>`` or ``user:<name>``."""
    if principal is None:
        return "cli"
    if getattr(principal, "is_master", False):
        return "master"
    user = getattr(principal, "user_name", None)
    if user:
        return f"user:{user}"
    return f"key:{principal.key_id}"


def section_hash(value: Any) -> str:
    return hashlib.sha256(
        orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    ).hexdigest()


def record_config(store: Store, sections: dict[str, Any], actor: str = "system") -> dict[str, Any] | None:
    """Append ``config.changed`` when the effective configuration differs from the last one recorded.

    ``sections`` maps a section name (models, routing, guardrails, ...) to its JSON-able value
    (secrets already replaced by fingerprints). Replicas starting together record one change: the
    comparison and the append happen under the chain's lock.
    """
    hashes = {name: section_hash(value) for name, value in sections.items()}
    with store.engine.begin() as conn:
        conn.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=AuditHead.seq))  # take the lock
        last = conn.execute(
            select(AuditRecord.details)
            .where(AuditRecord.action == "config.changed")
            .order_by(AuditRecord.seq.desc())
            .limit(1)
        ).scalar()
        before: dict[str, str] = (last or {}).get("sections", {}) if isinstance(last, dict) else {}
        changed = sorted(n for n in set(hashes) | set(before) if hashes.get(n) != before.get(n))
        if not changed:
            return None
        return append(
            conn,
            actor=actor,
            action="config.changed",
            target="config",
            details={"changed": changed, "sections": hashes, "first": last is None},
        )
