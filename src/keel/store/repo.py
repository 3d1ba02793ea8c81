"""The store's operations: projects, API keys, trace writes and trace queries.

Synchronous SQLAlchemy; async callers run these in a thread (the trace writer, the API).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Integer,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from keel.store.engine import make_engine, migrate
from keel.store.models import ApiKey, Project, Score, Span, Team, Trace, TraceTag
from keel.store.rollups import prompt_member, record_rollups
from keel.store.score_rollups import move_trace_scores
from keel.store.search import delete_text, index_spans, match_traces

__all__ = ["KeyRow", "Store", "TraceFilter", "hash_key", "new_key_secret", "utcnow"]

log = logging.getLogger("keel.store")
KEY_PREFIX = "sk-keel-"
PUBLIC_KEY_PREFIX = "pk-keel-"  # public keys: end-user feedback only, safe to ship in a browser


def utcnow() -> datetime:
    """Naive UTC now (the store keeps naive UTC on both dialects)."""
    return datetime.now(UTC).replace(tzinfo=None)


_EPOCH = datetime(1970, 1, 1)


def from_epoch(t: float) -> datetime:
    """Naive UTC datetime from epoch seconds (timedelta arithmetic: far cheaper than fromtimestamp(tz=UTC))."""
    return _EPOCH + timedelta(seconds=t)


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


def hash_key(secret: str) -> str:
    """Keys are stored as SHA-256 hex digests: they are high-entropy, so no KDF is needed."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _default_scopes(kind: str) -> list[str]:
    return [] if kind == "public" else ["gateway", "ingest", "read"]


def new_key_secret(prefix: str = KEY_PREFIX) -> str:
    return prefix + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRow:
    id: str
    project_id: str
    project_name: str
    name: str
    key_hash: str
    key_prefix: str
    allowed_models: list[str] | None
    created_at: datetime
    revoked_at: datetime | None
    metadata: dict[str, Any] | None
    team_id: str | None = None
    team_name: str | None = None
    end_user: str | None = None
    limits: dict[str, Any] | None = None
    team_limits: dict[str, Any] | None = None
    project_limits: dict[str, Any] | None = None
    kind: str = "secret"  # secret | public
    scopes: tuple[str, ...] | None = None  # None: the default scopes (keel.types.DEFAULT_SCOPES)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project_id": self.project_id,
            "project": self.project_name,
            "team_id": self.team_id,
            "team": self.team_name,
            "user": self.end_user,
            "limits": self.limits or {},
            "name": self.name,
            "key_prefix": self.key_prefix,
            "models": self.allowed_models,
            "metadata": self.metadata or {},
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
            "status": "revoked" if self.revoked_at else "active",
            "kind": self.kind,
            "scopes": sorted(self.scopes) if self.scopes is not None else _default_scopes(self.kind),
        }


@dataclass
class TraceFilter:
    project_id: str | None = None  # None: every project (master key)
    model: str | None = None
    status: str | None = None
    user: str | None = None
    session: str | None = None
    tag: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    key_id: str | None = None
    name: str | None = None
    team_id: str | None = None
    provider: str | None = None
    prompt_name: str | None = None
    prompt_version: int | None = None
    min_latency_ms: float | None = None
    max_latency_ms: float | None = None
    min_cost_usd: float | None = None
    max_cost_usd: float | None = None
    q: str | None = None  # full-text search over span input/output (keel.store.search)


def _explorer_conditions(f: TraceFilter, engine: Engine) -> list[Any]:
    """The trace explorer's further filters, each served by an index of migration 0005."""
    conds: list[Any] = []
    for col, value in (
        (Trace.name, f.name),
        (Trace.team_id, f.team_id),
        (Trace.provider, f.provider),
        (Trace.prompt_name, f.prompt_name),
        (Trace.prompt_version, f.prompt_version),
    ):
        if value is not None and value != "":
            conds.append(col == value)
    if f.min_latency_ms is not None:
        conds.append(Trace.latency_ms >= f.min_latency_ms)
    if f.max_latency_ms is not None:
        conds.append(Trace.latency_ms <= f.max_latency_ms)
    if f.min_cost_usd is not None:
        conds.append(Trace.cost_usd >= f.min_cost_usd)
    if f.max_cost_usd is not None:
        conds.append(Trace.cost_usd <= f.max_cost_usd)
    if f.q:
        conds.append(match_traces(engine, f.q))
    return conds


def _encode_cursor(dt: datetime, trace_id: str) -> str:
    return base64.urlsafe_b64encode(f"{dt.isoformat()}|{trace_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        pad = "=" * (-len(cursor) % 4)
        raw = base64.urlsafe_b64decode(cursor + pad).decode()
        ts, tid = raw.split("|", 1)
        return datetime.fromisoformat(ts), tid
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("invalid cursor") from exc


def _trace_dict(t: Trace) -> dict[str, Any]:
    return {
        "trace_id": t.trace_id,
        "project_id": t.project_id,
        "key_id": t.key_id,
        "name": t.name,
        "start_time": iso(t.start_time),
        "end_time": iso(t.end_time),
        "latency_ms": round(t.latency_ms, 3),
        "status": t.status,
        "model": t.model,
        "provider": t.provider,
        "user": t.user_id,
        "session_id": t.session_id,
        "tags": t.tags or [],
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "total_tokens": (t.input_tokens or 0) + (t.output_tokens or 0),
        "cost_usd": t.cost_usd,
        "error": t.error,
        "span_count": t.span_count,
        "prompt_name": t.prompt_name,
        "prompt_version": t.prompt_version,
    }


def _span_dict(s: Span) -> dict[str, Any]:
    return {
        "span_id": s.span_id,
        "trace_id": s.trace_id,
        "parent_span_id": s.parent_span_id,
        "name": s.name,
        "kind": s.kind,
        "start_time": iso(s.start_time),
        "end_time": iso(s.end_time),
        "latency_ms": round(s.latency_ms, 3),
        "ttft_ms": None if s.ttft_ms is None else round(s.ttft_ms, 3),
        "status": s.status,
        "status_code": s.status_code,
        "error": s.error,
        "model": s.model,
        "requested_model": s.requested_model,
        "provider": s.provider,
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens,
        "total_tokens": (s.input_tokens or 0) + (s.output_tokens or 0),
        "cost_usd": s.cost_usd,
        "priced": s.priced,
        "user": s.user_id,
        "prompt_name": s.prompt_name,
        "prompt_version": s.prompt_version,
        "input": s.input,
        "output": s.output,
        "attributes": s.attributes or {},
    }


class Store:
    """All database access of keel goes through here."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str, *, run_migrations: bool = True) -> Store:
        engine = make_engine(url)
        if run_migrations:
            migrate(engine)
        return cls(engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # -- projects ---------------------------------------------------------------------------------

    def ensure_project(self, name: str) -> str:
        """Return the id of project ``name``, creating it when missing."""
        with Session(self.engine) as s, s.begin():
            row = s.scalar(select(Project).where(Project.name == name))
            if row:
                return row.id
            pid = "proj_" + uuid.uuid4().hex[:16]
            s.add(Project(id=pid, name=name, created_at=utcnow()))
        return pid

    def set_project_limits(self, project_id: str, limits: dict[str, Any] | None) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(Project).where(Project.id == project_id).values(limits=limits or None))

    def list_projects(self) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            rows = s.scalars(select(Project).order_by(Project.name)).all()
            return [{"id": p.id, "name": p.name, "created_at": iso(p.created_at)} for p in rows]

    def get_project(self, ref: str) -> dict[str, Any] | None:
        """Find a project by id or by name."""
        with Session(self.engine) as s:
            p = s.scalar(select(Project).where(or_(Project.id == ref, Project.name == ref)))
            return None if p is None else {"id": p.id, "name": p.name, "created_at": iso(p.created_at)}

    # -- teams ----------------------------------------------------------------------------------------

    def ensure_team(self, project_id: str, name: str, limits: dict[str, Any] | None = None) -> dict[str, Any]:
        """The team ``name`` (or id) of a project, created when missing."""
        with Session(self.engine) as s, s.begin():
            t = s.scalar(
                select(Team).where(Team.project_id == project_id, or_(Team.name == name, Team.id == name))
            )
            if t is None:
                t = Team(
                    id="team_" + uuid.uuid4().hex[:16],
                    project_id=project_id,
                    name=name,
                    limits=limits or None,
                    created_at=utcnow(),
                )
                s.add(t)
            elif limits is not None:
                t.limits = limits or None
            return {
                "id": t.id,
                "project_id": t.project_id,
                "name": t.name,
                "limits": t.limits or {},
                "created_at": iso(t.created_at),
            }

    def list_teams(self, project_id: str | None = None) -> list[dict[str, Any]]:
        stmt = select(Team).order_by(Team.name)
        if project_id is not None:
            stmt = stmt.where(Team.project_id == project_id)
        with Session(self.engine) as s:
            return [
                {
                    "id": t.id,
                    "project_id": t.project_id,
                    "name": t.name,
                    "limits": t.limits or {},
                    "created_at": iso(t.created_at),
                }
                for t in s.scalars(stmt)
            ]

    # -- keys -------------------------------------------------------------------------------------

    def create_key(
        self,
        project: str,
        name: str,
        models: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
        team: str | None = None,
        end_user: str | None = None,
        limits: dict[str, Any] | None = None,
        kind: str = "secret",
        scopes: Sequence[str] | None = None,
    ) -> tuple[str, KeyRow]:
        """Create a virtual key in ``project`` (by name, created when missing). Returns (secret, row).

        ``team`` (name or id, created in the project when missing) and ``end_user`` attribute the
        key's usage; ``limits`` holds its rate limits and budgets. ``kind="public"`` makes a
        ``pk-keel-`` key that may only post end-user feedback.
        """
        if kind not in ("secret", "public"):
            raise ValueError(f"unknown key kind {kind!r}")
        pid = self.ensure_project(project) if not project.startswith("proj_") else project
        if self.get_project(pid) is None:
            raise LookupError(f"project {project!r} does not exist")
        tid = self.ensure_team(pid, team)["id"] if team else None
        secret = new_key_secret(PUBLIC_KEY_PREFIX if kind == "public" else KEY_PREFIX)
        kid = "key_" + uuid.uuid4().hex[:16]
        with Session(self.engine) as s, s.begin():
            s.add(
                ApiKey(
                    id=kid,
                    project_id=pid,
                    name=name,
                    key_hash=hash_key(secret),
                    key_prefix=secret[: len(KEY_PREFIX) + 4],
                    allowed_models=list(models) if models else None,
                    metadata_=metadata or None,
                    created_at=utcnow(),
                    team_id=tid,
                    end_user=end_user,
                    limits=limits or None,
                    kind=kind,
                    scopes=sorted(set(scopes)) if scopes is not None else _default_scopes(kind),
                )
            )
        row = self.get_key(kid)
        assert row is not None
        return secret, row

    def _key_rows(self, where: Any = None) -> list[KeyRow]:
        stmt = (
            select(ApiKey, Project.name, Team.name, Team.limits, Project.limits)
            .join(Project, Project.id == ApiKey.project_id)
            .outerjoin(Team, Team.id == ApiKey.team_id)
        )
        if where is not None:
            stmt = stmt.where(where)
        with Session(self.engine) as s:
            return [
                KeyRow(
                    id=k.id,
                    project_id=k.project_id,
                    project_name=pname,
                    name=k.name,
                    key_hash=k.key_hash,
                    key_prefix=k.key_prefix,
                    allowed_models=k.allowed_models,
                    created_at=k.created_at,
                    revoked_at=k.revoked_at,
                    metadata=k.metadata_,
                    team_id=k.team_id,
                    team_name=tname,
                    end_user=k.end_user,
                    limits=k.limits,
                    team_limits=tlimits,
                    project_limits=plimits,
                    kind=k.kind,
                    scopes=tuple(k.scopes) if k.scopes is not None else None,
                )
                for k, pname, tname, tlimits, plimits in s.execute(
                    stmt.order_by(ApiKey.created_at, ApiKey.id)
                ).all()
            ]

    def get_key(self, key_id: str) -> KeyRow | None:
        rows = self._key_rows(ApiKey.id == key_id)
        return rows[0] if rows else None

    def list_keys(self, project_id: str | None = None, include_revoked: bool = True) -> list[KeyRow]:
        conds = []
        if project_id:
            conds.append(ApiKey.project_id == project_id)
        if not include_revoked:
            conds.append(ApiKey.revoked_at.is_(None))
        return self._key_rows(and_(*conds) if conds else None)

    def active_keys(self) -> list[KeyRow]:
        return self.list_keys(include_revoked=False)

    def set_key_scopes(self, key_id: str, scopes: Sequence[str]) -> KeyRow | None:
        """Replace a key's scopes; None when there is no such key."""
        with Session(self.engine) as s, s.begin():
            s.execute(update(ApiKey).where(ApiKey.id == key_id).values(scopes=sorted(set(scopes))))
        return self.get_key(key_id)

    def revoke_key(self, key_id: str) -> KeyRow | None:
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return self.get_key(key_id)

    # -- traces: writes ---------------------------------------------------------------------------

    def write_spans(self, spans: Iterable[dict[str, Any]]) -> int:
        """Insert finished spans and fold them into their traces' summary rows, in one transaction.

        New traces (the common case: one gateway call) are summarised in Python and bulk-inserted;
        traces that already exist are updated. A span already stored (same trace_id and span_id) is
        skipped, so a retried batch is harmless.
        """
        batch = list(spans)
        if not batch:
            return 0
        trace_ids = list({sp["trace_id"] for sp in batch})
        with self.engine.begin() as conn:
            known = {
                row.trace_id: dict(row._mapping)
                for row in conn.execute(select(Trace).where(Trace.trace_id.in_(trace_ids)))
            }
            moved = _rehome(batch, known)
            if moved:  # the re-homed spans' own traces may exist already (an earlier batch)
                known.update(
                    (row.trace_id, dict(row._mapping))
                    for row in conn.execute(select(Trace).where(Trace.trace_id.in_(list(moved))))
                )
                trace_ids = list({sp["trace_id"] for sp in batch})
            existing_spans = set(
                conn.execute(select(Span.trace_id, Span.span_id).where(Span.trace_id.in_(trace_ids))).all()
            )
            fresh = [sp for sp in batch if (sp["trace_id"], sp["span_id"]) not in existing_spans]
            if not fresh:
                return 0
            bulk_insert(conn, Span.__table__, [_span_row(sp) for sp in fresh])
            index_spans(conn, fresh)
            prior = {tid: dict(t) for tid, t in known.items()}  # for the rollups' deltas (_fold mutates)
            new: dict[str, dict[str, Any]] = {}
            changed: dict[str, dict[str, Any]] = {}
            tag_rows: set[tuple[str, str]] = set()
            for sp in fresh:
                tid = sp["trace_id"]
                t = known.get(tid)
                if t is not None:
                    changed[tid] = t
                else:
                    t = new.get(tid)
                    if t is None:
                        t = new[tid] = _new_summary(sp)
                _fold(t, sp)
                for tag in sp.get("tags") or ():
                    tag_rows.add((tid, tag))
            if new:
                bulk_insert(conn, Trace.__table__, list(new.values()))
            for tid, t in changed.items():
                values = {k: v for k, v in t.items() if k != "trace_id"}
                conn.execute(update(Trace).where(Trace.trace_id == tid).values(**values))
            record_rollups(conn, new.values(), [(prior[t], changed[t]) for t in changed], fresh, known | new)
            if changed:
                _follow_changed(conn, prior, changed)
            if tag_rows:
                have: set[tuple[str, str]] = set()
                if changed:
                    have = set(
                        (r[0], r[1])
                        for r in conn.execute(
                            select(TraceTag.trace_id, TraceTag.tag).where(
                                TraceTag.trace_id.in_(list(changed))
                            )
                        ).all()
                    )
                new_tags = [
                    {"trace_id": tid, "tag": tag, "start_time": (new.get(tid) or changed[tid])["start_time"]}
                    for tid, tag in tag_rows
                    if (tid, tag) not in have
                ]
                if new_tags:
                    conn.execute(insert(TraceTag), new_tags)
        return len(fresh)

    def delete_traces_before(self, cutoff: datetime, batch: int = 1000) -> int:
        """Delete traces whose start is before ``cutoff``, in batches. Returns how many traces went."""
        total = 0
        while True:
            with Session(self.engine) as s, s.begin():
                ids = list(s.scalars(select(Trace.trace_id).where(Trace.start_time < cutoff).limit(batch)))
                if not ids:
                    return total
                delete_trace_rows(s, ids)
                total += len(ids)

    # -- traces: reads ----------------------------------------------------------------------------

    def list_traces(
        self, f: TraceFilter, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first, keyset pagination. Returns (page, next_cursor)."""
        stmt = select(Trace)
        # time order and keyset columns: with a tag, trace_tags' copies, so the page is a walk of its index
        ts, tid = Trace.start_time, Trace.trace_id
        if f.tag:
            stmt = stmt.join(TraceTag, TraceTag.trace_id == Trace.trace_id)
            ts, tid = TraceTag.start_time, TraceTag.trace_id
        conds: list[Any] = []
        if f.project_id is not None:
            conds.append(Trace.project_id == f.project_id)
        if f.model:
            conds.append(Trace.model == f.model)
        if f.status:
            conds.append(Trace.status == f.status)
        if f.user:
            conds.append(Trace.user_id == f.user)
        if f.session:
            conds.append(Trace.session_id == f.session)
        if f.key_id:
            conds.append(Trace.key_id == f.key_id)
        if f.start:
            conds.append(ts >= f.start)
        if f.end:
            conds.append(ts < f.end)
        if f.tag:
            conds.append(TraceTag.tag == f.tag)
        conds.extend(_explorer_conditions(f, self.engine))
        if cursor:
            cts, ctid = _decode_cursor(cursor)
            # ts <= cts first: a range the index seeks to (the OR alone is a filter on every row passed)
            conds.append(ts <= cts)
            conds.append(or_(ts < cts, and_(ts == cts, tid < ctid)))
        if conds:
            stmt = stmt.where(and_(*conds))
        stmt = stmt.order_by(ts.desc(), tid.desc()).limit(limit + 1)
        with Session(self.engine) as s:
            rows = list(s.scalars(stmt))
        nxt = None
        if len(rows) > limit:
            rows = rows[:limit]
            nxt = _encode_cursor(rows[-1].start_time, rows[-1].trace_id)
        return [_trace_dict(t) for t in rows], nxt

    def count_traces(self, project_id: str | None = None) -> int:
        stmt = select(func.count()).select_from(Trace)
        if project_id is not None:
            stmt = stmt.where(Trace.project_id == project_id)
        with Session(self.engine) as s:
            return int(s.scalar(stmt) or 0)

    def get_trace(self, trace_id: str, project_id: str | None = None) -> dict[str, Any] | None:
        """One trace with its spans (ordered by start), or None (also when in another project).

        A project asking for another project's trace id gets its own spans that named it, if any
        (they were stored under :func:`rehomed_trace_id`).
        """
        with Session(self.engine) as s:
            t = s.get(Trace, trace_id)
            if t is not None and project_id is not None and t.project_id != project_id:
                t = s.get(Trace, rehomed_trace_id(project_id, trace_id))
                trace_id = t.trace_id if t is not None else trace_id
            if t is None or (project_id is not None and t.project_id != project_id):
                return None
            spans = s.scalars(
                select(Span).where(Span.trace_id == trace_id).order_by(Span.start_time, Span.id)
            )
            out = _trace_dict(t)
            out["spans"] = [_span_dict(sp) for sp in spans]
            return out

    def usage(
        self,
        group_by: str,
        *,
        project_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Spend, tokens and requests of LLM and embedding calls, grouped; the busiest groups first.

        ``group_by``: project, team, key, user, model (the public name), provider, tag, prompt or
        prompt_version (``name:version``); or day /
        hour (UTC, ``YYYY-MM-DD`` / ``YYYY-MM-DDTHH``, oldest first) for a time series. Attempt
        spans are not counted: the request's own span carries its final tokens and cost.
        """
        if group_by in ("day", "hour"):
            return self._usage_series(group_by, project_id=project_id, start=start, end=end)
        cols = {
            "project": Span.project_id,
            "team": Span.team_id,
            "key": Span.key_id,
            "user": Span.user_id,
            "model": func.coalesce(Span.requested_model, Span.model),
            "provider": Span.provider,
            "prompt": Span.prompt_name,
            "prompt_version": Span.prompt_name + literal_column("':'") + Span.prompt_version.cast(String),
        }
        stmt_from: Any
        if group_by == "tag":
            group_col: Any = TraceTag.tag
            stmt_from = Span.__table__.join(TraceTag.__table__, TraceTag.trace_id == Span.trace_id)
        elif group_by in cols:
            group_col = cols[group_by]
            stmt_from = Span.__table__
        else:
            raise ValueError(f"cannot group by {group_by!r}")
        errors = func.sum(case((Span.status == "error", 1), else_=0))
        unpriced = func.sum(case((and_(Span.priced.is_(False), Span.status == "ok"), 1), else_=0))
        stmt = (
            select(
                group_col.label("group"),
                func.count().label("requests"),
                errors.label("errors"),
                func.coalesce(func.sum(Span.input_tokens), 0).label("input_tokens"),
                func.coalesce(func.sum(Span.output_tokens), 0).label("output_tokens"),
                func.coalesce(func.sum(Span.cost_usd), 0.0).label("cost_usd"),
                unpriced.label("unpriced"),
            )
            .select_from(stmt_from)
            .where(Span.kind.in_(("llm", "embedding")))
            .group_by(group_col)
            .order_by(func.coalesce(func.sum(Span.cost_usd), 0.0).desc(), func.count().desc())
        )
        if project_id is not None:
            stmt = stmt.where(Span.project_id == project_id)
        if start is not None:
            stmt = stmt.where(Span.start_time >= start)
        if end is not None:
            stmt = stmt.where(Span.start_time < end)
        with self.engine.connect() as conn:
            return [
                {
                    "group": r.group,
                    "requests": int(r.requests),
                    "errors": int(r.errors or 0),
                    "input_tokens": int(r.input_tokens or 0),
                    "output_tokens": int(r.output_tokens or 0),
                    "cost_usd": float(r.cost_usd or 0.0),
                    "unpriced": int(r.unpriced or 0),
                }
                for r in conn.execute(stmt)
            ]

    def _usage_series(
        self, bucket: str, *, project_id: str | None, start: datetime | None, end: datetime | None
    ) -> list[dict[str, Any]]:
        if self.dialect == "postgresql":
            fmt = "YYYY-MM-DD" if bucket == "day" else 'YYYY-MM-DD"T"HH24'
            col: Any = func.to_char(Span.start_time, fmt)
        else:
            col = func.strftime("%Y-%m-%d" if bucket == "day" else "%Y-%m-%dT%H", Span.start_time)
        stmt = (
            select(
                col.label("group"),
                func.count().label("requests"),
                func.sum(case((Span.status == "error", 1), else_=0)).label("errors"),
                func.coalesce(func.sum(Span.input_tokens), 0).label("input_tokens"),
                func.coalesce(func.sum(Span.output_tokens), 0).label("output_tokens"),
                func.coalesce(func.sum(Span.cost_usd), 0.0).label("cost_usd"),
                func.sum(case((and_(Span.priced.is_(False), Span.status == "ok"), 1), else_=0)).label(
                    "unpriced"
                ),
            )
            .where(Span.kind.in_(("llm", "embedding")))
            .group_by(col)
            .order_by(col)
        )
        if project_id is not None:
            stmt = stmt.where(Span.project_id == project_id)
        if start is not None:
            stmt = stmt.where(Span.start_time >= start)
        if end is not None:
            stmt = stmt.where(Span.start_time < end)
        with self.engine.connect() as conn:
            return [
                {
                    "group": r.group,
                    "requests": int(r.requests),
                    "errors": int(r.errors or 0),
                    "input_tokens": int(r.input_tokens or 0),
                    "output_tokens": int(r.output_tokens or 0),
                    "cost_usd": float(r.cost_usd or 0.0),
                    "unpriced": int(r.unpriced or 0),
                }
                for r in conn.execute(stmt)
            ]

    def distinct_models(self, project_id: str | None = None, since_days: int = 30) -> list[str]:
        stmt = select(Trace.model).where(
            Trace.model.is_not(None), Trace.start_time >= utcnow() - timedelta(days=since_days)
        )
        if project_id is not None:
            stmt = stmt.where(Trace.project_id == project_id)
        with Session(self.engine) as s:
            return sorted({m for m in s.scalars(stmt.distinct().limit(200)) if m})


def rehomed_trace_id(project_id: str, trace_id: str) -> str:
    """Where a project's spans naming another project's trace are stored: a trace id of its own."""
    return hashlib.sha256(f"{project_id}:{trace_id}".encode()).hexdigest()[:32]


def _rehome(batch: list[dict[str, Any]], known: dict[str, dict[str, Any]]) -> set[str]:
    """Keep every project's spans out of other projects' traces, without losing any (in place).

    A trace belongs to the project of its first span. A span of another project naming that trace
    id (a forged or leaked traceparent, an OTLP export) is stored in a trace of its own project
    instead (:func:`rehomed_trace_id`, marked ``keel.rehomed_from``), where its project finds it
    under the id it was given (the trace API resolves it). Master-key gateway spans (no project)
    may join any trace, and a trace they started belongs to the first project that joins it.
    Returns the trace ids spans were moved to.
    """
    owner = {tid: t.get("project_id") for tid, t in known.items()}
    moved: set[str] = set()
    for i, sp in enumerate(batch):
        pid = sp.get("project_id")
        tid = sp["trace_id"]
        first = owner.get(tid)
        if first is None:
            owner[tid] = first = pid
        if pid is None or first == pid:
            continue
        new_tid = rehomed_trace_id(pid, tid)
        batch[i] = {
            **sp,
            "trace_id": new_tid,
            "attributes": {**(sp.get("attributes") or {}), "keel.rehomed_from": tid},
        }
        moved.add(new_tid)
    if moved:
        log.warning(
            "stored %d spans naming another project's trace in their own project's traces", len(moved)
        )
    return moved


def _follow_changed(
    conn: Connection, prior: dict[str, dict[str, Any]], changed: dict[str, dict[str, Any]]
) -> None:
    """What follows a stored trace that later spans changed: its tags' start_time and its scores'
    rollups (when its model or prompt version changed)."""
    moved = [
        (tid, t["start_time"]) for tid, t in changed.items() if t["start_time"] != prior[tid]["start_time"]
    ]
    if moved:
        conn.execute(
            update(TraceTag).where(TraceTag.trace_id == bindparam("tid")).values(start_time=bindparam("st")),
            [{"tid": tid, "st": st} for tid, st in moved],
        )
    move_trace_scores(
        conn,
        {
            tid: (
                (
                    prior[tid]["model"] or "",
                    prompt_member(prior[tid]["prompt_name"], prior[tid]["prompt_version"]),
                ),
                (t["model"] or "", prompt_member(t["prompt_name"], t["prompt_version"])),
            )
            for tid, t in changed.items()
        },
    )


def delete_trace_rows(s: Session, ids: list[str]) -> None:
    """Delete traces by id with everything stored about them (scores, spans, search text, tags)."""
    # the metric and score rollups are left as they are: dashboards keep the history (docs/observability.md)
    # the trace rows first: their row locks wait for scores being added (which hold FOR SHARE on
    # the trace), so the score delete below sees them and none is left behind
    s.execute(delete(Trace).where(Trace.trace_id.in_(ids)))
    s.execute(delete(Score).where(Score.trace_id.in_(ids)))
    s.execute(delete(Span).where(Span.trace_id.in_(ids)))
    delete_text(s.connection(), ids)
    s.execute(delete(TraceTag).where(TraceTag.trace_id.in_(ids)))


def _sqlite_time(v: datetime | None) -> str | None:
    # the exact text SQLAlchemy stores for DateTime on SQLite, so comparisons and reads agree
    return None if v is None else v.isoformat(" ", "microseconds")


def _json_text(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS).decode()


_INSERT_SQL: dict[tuple[str, str], tuple[str, list[tuple[str, Any]]]] = {}


def bulk_insert(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """executemany straight on the driver, values converted once here.

    The trace writer's hottest statement: SQLAlchemy's per-row bind processing costs several times
    the insert itself. Conversions match what SQLAlchemy itself stores (JSON text, SQLite datetimes).
    """
    if not rows:
        return
    dialect = conn.dialect.name
    cached = _INSERT_SQL.get((dialect, table.name))
    if cached is None:
        cols = [
            c
            for c in table.columns
            if not (c.primary_key and c.autoincrement is True and isinstance(c.type, Integer | BigInteger))
        ]
        convs: list[tuple[str, Any]] = []
        marks = []
        for c in cols:
            if isinstance(c.type, JSON):
                convs.append((c.name, _json_text))
                marks.append("CAST(%s AS JSONB)" if dialect == "postgresql" else "?")
            elif isinstance(c.type, DateTime) and dialect == "sqlite":
                convs.append((c.name, _sqlite_time))
                marks.append("?")
            elif isinstance(c.type, Boolean) and dialect == "sqlite":
                convs.append((c.name, lambda v: None if v is None else int(bool(v))))
                marks.append("?")
            else:
                convs.append((c.name, None))
                marks.append("%s" if dialect == "postgresql" else "?")
        names = ", ".join(f'"{c.name}"' for c in cols)
        sql = f'INSERT INTO "{table.name}" ({names}) VALUES ({", ".join(marks)})'
        cached = _INSERT_SQL[(dialect, table.name)] = (sql, convs)
    sql, convs = cached
    params = [tuple(row.get(name) if fn is None else fn(row.get(name)) for name, fn in convs) for row in rows]
    conn.exec_driver_sql(sql, params)


def _span_row(sp: dict[str, Any]) -> dict[str, Any]:
    return {
        "trace_id": sp["trace_id"],
        "span_id": sp["span_id"],
        "parent_span_id": sp.get("parent_span_id"),
        "project_id": sp.get("project_id"),
        "key_id": sp.get("key_id"),
        "team_id": sp.get("team_id"),
        "name": sp["name"],
        "kind": sp["kind"],
        "start_time": sp["start_time"],
        "end_time": sp["end_time"],
        "latency_ms": sp["latency_ms"],
        "ttft_ms": sp.get("ttft_ms"),
        "status": sp["status"],
        "status_code": sp.get("status_code"),
        "error": sp.get("error"),
        "model": sp.get("model"),
        "requested_model": sp.get("requested_model"),
        "provider": sp.get("provider"),
        "input_tokens": sp.get("input_tokens"),
        "output_tokens": sp.get("output_tokens"),
        "cost_usd": sp.get("cost_usd"),
        "priced": sp.get("priced", True),
        "user_id": sp.get("user"),
        "prompt_name": sp.get("prompt_name"),
        "prompt_version": sp.get("prompt_version"),
        "input": sp.get("input"),
        "output": sp.get("output"),
        "attributes": sp.get("attributes") or None,
    }


def _new_summary(sp: dict[str, Any]) -> dict[str, Any]:
    return {
        "trace_id": sp["trace_id"],
        "project_id": None,
        "key_id": None,
        "team_id": None,
        "name": sp["name"],
        "start_time": sp["start_time"],
        "end_time": sp["end_time"],
        "latency_ms": 0.0,
        "status": "ok",
        "model": None,
        "provider": None,
        "user_id": None,
        "session_id": None,
        "tags": None,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_usd": None,
        "error": None,
        "span_count": 0,
        "prompt_name": None,
        "prompt_version": None,
        "ttft_sum_ms": None,
        "ttft_count": None,
    }


def _fold(t: dict[str, Any], sp: dict[str, Any]) -> None:
    """Fold one span into its trace's summary (a dict of the traces row)."""
    t["span_count"] = (t["span_count"] or 0) + 1
    if sp["start_time"] < t["start_time"]:
        t["start_time"] = sp["start_time"]
    if sp["end_time"] > t["end_time"]:
        t["end_time"] = sp["end_time"]
    t["latency_ms"] = (t["end_time"] - t["start_time"]).total_seconds() * 1000.0
    if sp.get("parent_span_id") is None:
        t["name"] = sp["name"]
    if sp["status"] == "error":
        t["status"] = "error"
        t["error"] = t["error"] or sp.get("error")
    for col, key in (
        ("project_id", "project_id"),
        ("key_id", "key_id"),
        ("team_id", "team_id"),
        ("user_id", "user"),
        ("session_id", "session_id"),
        ("prompt_name", "prompt_name"),
        ("prompt_version", "prompt_version"),
    ):
        if t[col] is None and sp.get(key) is not None:
            t[col] = sp[key]
    if sp["kind"] == "llm" and sp.get("ttft_ms") is not None:
        t["ttft_sum_ms"] = (t.get("ttft_sum_ms") or 0.0) + sp["ttft_ms"]
        t["ttft_count"] = (t.get("ttft_count") or 0) + 1
    if sp["kind"] in ("llm", "embedding"):
        t["model"] = t["model"] or sp.get("requested_model") or sp.get("model")
        t["provider"] = t["provider"] or sp.get("provider")
        t["input_tokens"] = (t["input_tokens"] or 0) + (sp.get("input_tokens") or 0)
        t["output_tokens"] = (t["output_tokens"] or 0) + (sp.get("output_tokens") or 0)
        if sp.get("cost_usd") is not None:
            t["cost_usd"] = (t["cost_usd"] or 0.0) + sp["cost_usd"]
    tags = sp.get("tags")
    if tags:
        t["tags"] = sorted(set(t["tags"] or []) | set(tags))
