"""Sessions and end users: traces grouped by ``session_id`` or ``user_id``, newest activity first.

A page of groups is found by walking the traces newest-first through the (column, start_time) and
start_time indexes until enough distinct groups are seen, then only those groups are aggregated:
the cost follows the page size, not the number of sessions or users stored.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, case, func, or_, select

from keel.store.models import Span, Trace
from keel.store.repo import _trace_dict, iso
from keel.store.search import last_user_text, output_text

__all__ = ["GroupFilter", "get_session", "get_user", "list_sessions", "list_users"]

_SCAN_CHUNK = 500


@dataclass
class GroupFilter:
    project_id: str | None = None  # None: every project (master key)
    user: str | None = None
    session: str | None = None
    start: datetime | None = None
    end: datetime | None = None


def _encode(dt: datetime, ident: str) -> str:
    return base64.urlsafe_b64encode(f"{dt.isoformat()}|{ident}".encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, ident = raw.split("|", 1)
        return datetime.fromisoformat(ts), ident
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc


def _conds(f: GroupFilter) -> list[Any]:
    conds: list[Any] = []
    if f.project_id is not None:
        conds.append(Trace.project_id == f.project_id)
    if f.user:
        conds.append(Trace.user_id == f.user)
    if f.session:
        conds.append(Trace.session_id == f.session)
    if f.start is not None:
        conds.append(Trace.start_time >= f.start)
    if f.end is not None:
        conds.append(Trace.start_time < f.end)
    return conds


def _page_of_groups(
    engine: Engine, col: Any, f: GroupFilter, limit: int, cursor: str | None
) -> tuple[list[str], bool]:
    """Ids of the next ``limit`` groups by last activity (newest first, ties by id descending)."""
    base = [col.is_not(None), *_conds(f)]
    after: tuple[datetime, str] | None = _decode(cursor) if cursor else None
    found: list[tuple[datetime, str]] = []  # (last activity, group id)
    seen: set[str] = set()
    pos: tuple[datetime, str] | None = None  # keyset position of the trace scan
    with engine.connect() as conn:
        while True:
            stmt = select(col, Trace.start_time, Trace.trace_id).where(*base)
            if after is not None:
                stmt = stmt.where(Trace.start_time <= after[0])
            if pos is not None:
                stmt = stmt.where(
                    or_(Trace.start_time < pos[0], and_(Trace.start_time == pos[0], Trace.trace_id < pos[1]))
                )
            rows = conn.execute(
                stmt.order_by(Trace.start_time.desc(), Trace.trace_id.desc()).limit(_SCAN_CHUNK)
            ).all()
            fresh: list[tuple[datetime, str]] = []
            for gid, ts, _tid in rows:
                if gid not in seen:  # met first in a newest-first scan: ts is the group's last activity
                    seen.add(gid)
                    fresh.append((ts, gid))
            if after is not None and fresh:
                # a group first met here may have later traces: then an earlier page showed it
                later = set(
                    conn.scalars(
                        select(col)
                        .where(*base, col.in_([g for _, g in fresh]), Trace.start_time > after[0])
                        .distinct()
                    )
                )
                fresh = [(ts, g) for ts, g in fresh if g not in later and (ts < after[0] or g < after[1])]
            found.extend(fresh)
            if len(rows) < _SCAN_CHUNK:
                break
            pos = (rows[-1][1], rows[-1][2])
            if len(found) > limit:
                # done once no unseen group can tie with or beat the page's last one
                if pos[0] < sorted(found, reverse=True)[limit - 1][0]:
                    break
    found.sort(reverse=True)
    return [g for _, g in found[:limit]], len(found) > limit


def _aggregate(engine: Engine, col: Any, ids: list[str], f: GroupFilter, extra: list[Any]) -> dict[str, Any]:
    errors = func.sum(case((Trace.status == "error", 1), else_=0))
    stmt = (
        select(
            col.label("gid"),
            func.count().label("traces"),
            func.min(Trace.start_time).label("first"),
            func.max(Trace.start_time).label("last"),
            func.coalesce(func.sum(Trace.input_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(Trace.output_tokens), 0).label("output_tokens"),
            func.sum(Trace.cost_usd).label("cost_usd"),
            errors.label("errors"),
            *extra,
        )
        .where(col.in_(ids), *_conds(f))
        .group_by(col)
    )
    with engine.connect() as conn:
        return {r.gid: r for r in conn.execute(stmt)}


def _group_dict(r: Any) -> dict[str, Any]:
    return {
        "trace_count": int(r.traces),
        "first_time": iso(r.first),
        "last_time": iso(r.last),
        "input_tokens": int(r.input_tokens or 0),
        "output_tokens": int(r.output_tokens or 0),
        "total_tokens": int(r.input_tokens or 0) + int(r.output_tokens or 0),
        "cost_usd": None if r.cost_usd is None else float(r.cost_usd),
        "errors": int(r.errors or 0),
    }


def _cursor_after(rows: list[dict[str, Any]], key: str, last: dict[str, datetime]) -> str:
    ident = rows[-1][key]
    return _encode(last[ident], ident)


def list_sessions(
    engine: Engine, f: GroupFilter, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Sessions with activity matching ``f``, most recently active first. Returns (page, next_cursor)."""
    ids, more = _page_of_groups(engine, Trace.session_id, f, limit, cursor)
    if not ids:
        return [], None
    agg = _aggregate(engine, Trace.session_id, ids, f, [func.max(Trace.user_id).label("user")])
    out = [{"session_id": sid, "user": agg[sid].user, **_group_dict(agg[sid])} for sid in ids if sid in agg]
    last = {sid: agg[sid].last for sid in agg}
    return out, (_cursor_after(out, "session_id", last) if more and out else None)


def list_users(
    engine: Engine, f: GroupFilter, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """End users with activity matching ``f``, most recently seen first. Returns (page, next_cursor)."""
    ids, more = _page_of_groups(engine, Trace.user_id, f, limit, cursor)
    if not ids:
        return [], None
    agg = _aggregate(
        engine, Trace.user_id, ids, f, [func.count(func.distinct(Trace.session_id)).label("sessions")]
    )
    out = [
        {"user": uid, "session_count": int(agg[uid].sessions or 0), **_group_dict(agg[uid])}
        for uid in ids
        if uid in agg
    ]
    last = {uid: agg[uid].last for uid in agg}
    return out, (_cursor_after(out, "user", last) if more and out else None)


def _turns(engine: Engine, traces: list[dict[str, Any]]) -> None:
    """Give each trace its conversation turn: the last user message of its first LLM call, the reply of its last."""
    if not traces:
        return
    ids = [t["trace_id"] for t in traces]
    stmt = (
        select(Span.trace_id, Span.input, Span.output)
        .where(Span.trace_id.in_(ids), Span.kind == "llm")
        .order_by(Span.trace_id, Span.start_time, Span.id)
    )
    first_in: dict[str, str | None] = {}
    last_out: dict[str, str | None] = {}
    with engine.connect() as conn:
        for tid, inp, out in conn.execute(stmt):
            if tid not in first_in:
                first_in[tid] = last_user_text(inp)
            text = output_text(out)
            if text is not None or tid not in last_out:
                last_out[tid] = text
    for t in traces:
        t["input_text"] = first_in.get(t["trace_id"])
        t["output_text"] = last_out.get(t["trace_id"])


def _traces_in_order(
    engine: Engine, f: GroupFilter, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Traces matching ``f``, oldest first (a conversation reads top to bottom), keyset-paginated."""
    stmt = select(Trace).where(*_conds(f))
    if cursor:
        cts, ctid = _decode(cursor)
        stmt = stmt.where(or_(Trace.start_time > cts, and_(Trace.start_time == cts, Trace.trace_id > ctid)))
    stmt = stmt.order_by(Trace.start_time, Trace.trace_id).limit(limit + 1)
    with engine.connect() as conn:
        rows = list(conn.execute(stmt))
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = _encode(rows[-1].start_time, rows[-1].trace_id)
    return [_trace_dict(r) for r in rows], nxt  # type: ignore[arg-type]


def get_session(
    engine: Engine, session_id: str, project_id: str | None, *, limit: int = 100, cursor: str | None = None
) -> dict[str, Any] | None:
    """A session's summary and its traces in order, each with its turn (input and output text)."""
    f = GroupFilter(project_id=project_id, session=session_id)
    agg = _aggregate(engine, Trace.session_id, [session_id], f, [func.max(Trace.user_id).label("user")])
    if session_id not in agg:
        return None
    r = agg[session_id]
    traces, nxt = _traces_in_order(engine, f, limit, cursor)
    _turns(engine, traces)
    return {"session_id": session_id, "user": r.user, **_group_dict(r), "traces": traces, "next_cursor": nxt}


def get_user(engine: Engine, user: str, project_id: str | None) -> dict[str, Any] | None:
    """An end user's summary: traces, sessions, tokens, cost, errors, first and last seen, models used."""
    f = GroupFilter(project_id=project_id, user=user)
    agg = _aggregate(
        engine, Trace.user_id, [user], f, [func.count(func.distinct(Trace.session_id)).label("sessions")]
    )
    if user not in agg:
        return None
    r = agg[user]
    stmt = (
        select(Trace.model, func.count().label("n"))
        .where(*_conds(f), Trace.model.is_not(None))
        .group_by(Trace.model)
        .order_by(func.count().desc())
        .limit(20)
    )
    with engine.connect() as conn:
        models = [{"model": m, "trace_count": int(n)} for m, n in conn.execute(stmt)]
    return {"user": user, "session_count": int(r.sessions or 0), **_group_dict(r), "models": models}
