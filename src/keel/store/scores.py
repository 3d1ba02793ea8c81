"""Scores on traces and spans, and per-project trace retention.

Functions take a :class:`~keel.store.Store`; they are synchronous (async callers run them in a thread).
"""

from __future__ import annotations

import base64
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from keel.store.models import Project, Score, Span, Trace
from keel.store.repo import Store, bulk_insert, delete_trace_rows, iso, utcnow
from keel.store.score_rollups import record_scores, trace_members

__all__ = [
    "DATA_TYPES",
    "SOURCES",
    "ScoreFilter",
    "add_score",
    "delete_project_traces_before",
    "delete_score",
    "insert_scores",
    "list_scores",
    "project_retention",
    "score_dict",
    "set_project_retention",
    "sweep_retention",
    "trace_scores",
]

DATA_TYPES = ("numeric", "boolean", "categorical")
SOURCES = ("human", "api", "eval")


@dataclass
class ScoreFilter:
    project_id: str | None = None  # None: every project (master key)
    trace_id: str | None = None
    span_id: str | None = None
    name: str | None = None
    source: str | None = None
    data_type: str | None = None
    start: datetime | None = None  # created at or after
    end: datetime | None = None  # created before


def score_dict(s: Score) -> dict[str, Any]:
    """The wire shape of a score: ``value`` is a float, a bool or a label by ``data_type``."""
    value: float | bool | str | None
    if s.data_type == "boolean":
        value = None if s.value is None else s.value >= 0.5
    elif s.data_type == "categorical":
        value = s.string_value
    else:
        value = s.value
    return {
        "id": s.id,
        "project_id": s.project_id,
        "trace_id": s.trace_id,
        "span_id": s.span_id,
        "name": s.name,
        "data_type": s.data_type,
        "value": value,
        "source": s.source,
        "comment": s.comment,
        "author": s.author,
        "created_at": iso(s.created_at),
    }


def _score_row(s: Score) -> dict[str, Any]:
    """The columns the score rollups need."""
    return {
        "trace_id": s.trace_id,
        "project_id": s.project_id,
        "name": s.name,
        "data_type": s.data_type,
        "value": s.value,
        "string_value": s.string_value,
        "created_at": s.created_at,
    }


def _span_exists(s: Session, trace_id: str, span_id: str) -> bool:
    stmt = select(Span.id).where(Span.trace_id == trace_id, Span.span_id == span_id).limit(1)
    return s.execute(stmt).first() is not None


def add_score(
    store: Store,
    *,
    trace_id: str,
    name: str,
    data_type: str,
    value: float | bool | str,
    source: str,
    span_id: str | None = None,
    comment: str | None = None,
    author: str | None = None,
    project_id: str | None = None,
) -> dict[str, Any] | None:
    """Store a score on a trace (or one of its spans); None when the trace (or span) is not stored
    or, with ``project_id``, belongs to another project. Values must already match ``data_type``."""
    if data_type not in DATA_TYPES:
        raise ValueError(f"unknown data_type {data_type!r}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}")
    num: float | None = None
    label: str | None = None
    if data_type == "boolean":
        num = 1.0 if value else 0.0
    elif data_type == "numeric":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("a numeric score needs a finite number")
        num = float(value)
    else:
        if not isinstance(value, str):
            raise ValueError("a categorical score needs a string label")
        label = value
    with Session(store.engine) as s, s.begin():
        # FOR SHARE: a retention sweep deleting this trace waits for the score, then deletes it too
        # (delete_trace_rows deletes the trace row first); a score after the sweep finds no trace
        row = s.execute(
            select(Trace.project_id).where(Trace.trace_id == trace_id).with_for_update(read=True)
        ).first()
        if row is None or (project_id is not None and row[0] != project_id):
            return None
        if span_id is not None and not _span_exists(s, trace_id, span_id):
            return None
        score = Score(
            id="score_" + uuid.uuid4().hex[:20],
            project_id=row[0],
            trace_id=trace_id,
            span_id=span_id,
            name=name,
            data_type=data_type,
            value=num,
            string_value=label,
            source=source,
            comment=comment,
            author=author,
            created_at=utcnow(),
        )
        s.add(score)
        s.flush()
        # read the trace's model and prompt now, holding it: the writer cannot move them in between
        conn = s.connection()
        record_scores(conn, [_score_row(score)], trace_members(conn, [trace_id], lock=True))
        return score_dict(score)


def insert_scores(store: Store, rows: list[dict[str, Any]], *, batch: int = 5000) -> int:
    """Bulk-load scores (dicts of the ``scores`` columns, e.g. an import or a benchmark), keeping the
    score rollups; unlike ``add_score`` nothing is validated. Returns how many were written."""
    for k in range(0, len(rows), batch):
        chunk = rows[k : k + batch]
        with store.engine.begin() as conn:
            bulk_insert(conn, Score.__table__, chunk)
            record_scores(conn, chunk, trace_members(conn, (r["trace_id"] for r in chunk), lock=True))
    return len(rows)


def trace_scores(store: Store, trace_id: str) -> list[dict[str, Any]]:
    """Every score of one trace, oldest first."""
    stmt = select(Score).where(Score.trace_id == trace_id).order_by(Score.created_at, Score.id)
    with Session(store.engine) as s:
        return [score_dict(x) for x in s.scalars(stmt)]


def _encode_cursor(dt: datetime, sid: str) -> str:
    return base64.urlsafe_b64encode(f"{dt.isoformat()}|{sid}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, sid = raw.split("|", 1)
        return datetime.fromisoformat(ts), sid
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc


def list_scores(
    store: Store, f: ScoreFilter, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset pagination. Returns (page, next_cursor); ValueError on a bad cursor."""
    conds: list[Any] = []
    if f.project_id is not None:
        conds.append(Score.project_id == f.project_id)
    for col, v in (
        (Score.trace_id, f.trace_id),
        (Score.span_id, f.span_id),
        (Score.name, f.name),
        (Score.source, f.source),
        (Score.data_type, f.data_type),
    ):
        if v is not None:
            conds.append(col == v)
    if f.start is not None:
        conds.append(Score.created_at >= f.start)
    if f.end is not None:
        conds.append(Score.created_at < f.end)
    if cursor:
        cts, cid = _decode_cursor(cursor)
        conds.append(or_(Score.created_at < cts, and_(Score.created_at == cts, Score.id < cid)))
    stmt = select(Score)
    if conds:
        stmt = stmt.where(and_(*conds))
    stmt = stmt.order_by(Score.created_at.desc(), Score.id.desc()).limit(limit + 1)
    with Session(store.engine) as s:
        rows = list(s.scalars(stmt))
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = _encode_cursor(rows[-1].created_at, rows[-1].id)
    return [score_dict(x) for x in rows], nxt


def delete_score(store: Store, score_id: str, project_id: str | None = None) -> dict[str, Any] | None:
    """Delete one score; returns it, or None when absent (or, with ``project_id``, in another project)."""
    with Session(store.engine) as s, s.begin():
        score = s.get(Score, score_id)
        if score is None or (project_id is not None and score.project_id != project_id):
            return None
        out = score_dict(score)
        row = _score_row(score)
        s.delete(score)
        s.flush()
        conn = s.connection()
        record_scores(conn, [row], trace_members(conn, [score.trace_id], lock=True), sign=-1)
        return out


# -- retention ------------------------------------------------------------------------------------


def set_project_retention(store: Store, project_id: str, days: float | None) -> None:
    """Set a project's retention (None: follow the global setting; 0: keep forever)."""
    with Session(store.engine) as s, s.begin():
        s.execute(update(Project).where(Project.id == project_id).values(retention_days=days))


def project_retention(store: Store) -> list[dict[str, Any]]:
    """Every project with its own retention_days (None when it follows the global setting)."""
    with Session(store.engine) as s:
        rows = s.execute(
            select(Project.id, Project.name, Project.retention_days).order_by(Project.name)
        ).all()
    return [{"id": r.id, "name": r.name, "retention_days": r.retention_days} for r in rows]


def delete_project_traces_before(
    store: Store,
    cutoff: datetime,
    *,
    project_id: str | None = None,
    exclude_projects: list[str] | None = None,
    batch: int = 1000,
) -> int:
    """Delete traces (with their spans, tags and scores) that started before ``cutoff``, in batches of
    ``batch`` traces, one transaction each. ``project_id`` limits it to one project;
    ``exclude_projects`` spares those (traces without a project are never spared). Returns the count."""
    conds: list[Any] = [Trace.start_time < cutoff]
    if project_id is not None:
        conds.append(Trace.project_id == project_id)
    elif exclude_projects:
        conds.append(or_(Trace.project_id.is_(None), Trace.project_id.not_in(exclude_projects)))
    total = 0
    while True:
        with Session(store.engine) as s, s.begin():
            # replicas sweeping at once skip each other's rows (PostgreSQL; SQLite serialises writers)
            stmt = select(Trace.trace_id).where(*conds).limit(batch).with_for_update(skip_locked=True)
            ids = list(s.scalars(stmt))
            if not ids:
                return total
            delete_trace_rows(s, ids)
            total += len(ids)


def sweep_retention(
    store: Store, default_days: float, *, now: datetime | None = None, batch: int = 1000
) -> dict[str | None, int]:
    """One retention pass: projects with their own ``retention_days`` use it (0 keeps forever);
    every other trace follows ``default_days`` (0 keeps forever). Returns deletions per project id
    (None: the traces that followed the global setting)."""
    now = now or utcnow()
    overrides = {
        p["id"]: p["retention_days"] for p in project_retention(store) if p["retention_days"] is not None
    }
    out: dict[str | None, int] = {}
    for pid, days in overrides.items():
        if days > 0:
            n = delete_project_traces_before(store, now - timedelta(days=days), project_id=pid, batch=batch)
            if n:
                out[pid] = n
    if default_days > 0:
        n = delete_project_traces_before(
            store, now - timedelta(days=default_days), exclude_projects=list(overrides), batch=batch
        )
        if n:
            out[None] = n
    return out
