"""Keeping the metric rollups current: called by the trace writer inside its transaction.

A trace counts once, in the minute it started. When later spans change a stored trace (its
status, tokens, start, model...), the old contribution is subtracted and the new one added, so
the rollups always equal an aggregate of the traces table. Each minute's delta is added to the
minute, hour and day rows at once (an upsert per touched row, rows sorted so concurrent writers
lock them in the same order). Users and sessions are too many for minute rows: they get hour and
day rows only (``COARSE_GRAINS``); the reader takes the partial hours at a range's edges from the
traces table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select

from keel.store.models import Span, Trace
from keel.store.models_rollups import HIST_BUCKETS, MetricRollup, ScoreRollup

__all__ = [
    "COARSE_GRAINS",
    "GRAINS",
    "HIST_COLUMNS",
    "MEASURES",
    "hist_bounds",
    "hist_bucket",
    "prompt_member",
    "prune_minute_rows",
    "rebuild_rollups",
    "record_rollups",
]

GRAINS = (60, 3600, 86400)
COARSE_GRAINS = (3600, 86400)  # the grains of the many-valued dims, user and session
MINUTE_DIMS = ("all", "model", "prompt", "tag")  # the dims with minute rows
HIST_COLUMNS = tuple(f"h{k:02d}" for k in range(HIST_BUCKETS))
MEASURES = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_sum_ms",
    "ttft_sum_ms",
    "ttft_count",
    *HIST_COLUMNS,
)
_H0 = MEASURES.index("h00")
_TTFT_SUM = MEASURES.index("ttft_sum_ms")
_KEY = ("grain", "bucket", "project_id", "dim", "member")
_EPOCH = datetime(1970, 1, 1)

# (minute, project_id, model, prompt, tags, user, session)
Cell = tuple[int, str, str, str, tuple[str, ...], str, str]


def hist_bucket(ms: float) -> int:
    """The latency histogram bucket of ``ms``: [0, 1) is 0, then two buckets per doubling up to 2^19 ms."""
    if not ms >= 1.0:  # also catches NaN
        return 0
    return min(HIST_BUCKETS - 1, int(2.0 * math.log2(ms)) + 1)


def hist_bounds(k: int) -> tuple[float, float]:
    """The [low, high) milliseconds of histogram bucket ``k`` (the last one is open; its high is a guess)."""
    if k == 0:
        return 0.0, 1.0
    low = 2.0 ** ((k - 1) / 2)
    return low, low * math.sqrt(2.0)


def prompt_member(name: str | None, version: int | None) -> str:
    """The rollup member of a prompt version: ``name@version`` (``name`` alone when unversioned)."""
    if not name:
        return ""
    return name if version is None else f"{name}@{version}"


def _minute(dt: datetime) -> int:
    return int((dt - _EPOCH).total_seconds()) // 60 * 60


def _cell(t: Mapping[str, Any]) -> Cell:
    return (
        _minute(t["start_time"]),
        t.get("project_id") or "",
        t.get("model") or "",
        prompt_member(t.get("prompt_name"), t.get("prompt_version")),
        tuple(t.get("tags") or ("",)),
        t.get("user_id") or "",
        t.get("session_id") or "",
    )


def _vec(acc: dict[Cell, list[float]], t: Mapping[str, Any]) -> list[float]:
    cell = _cell(t)
    vec = acc.get(cell)
    if vec is None:
        vec = acc[cell] = list(_ZERO)
    return vec


def _add(acc: dict[Cell, list[float]], t: Mapping[str, Any], sign: int) -> None:
    vec = _vec(acc, t)
    latency = float(t.get("latency_ms") or 0.0)
    vec[0] += sign
    if t.get("status") == "error":
        vec[1] += sign
    vec[2] += sign * int(t.get("input_tokens") or 0)
    vec[3] += sign * int(t.get("output_tokens") or 0)
    vec[4] += sign * (t.get("cost_usd") or 0.0)
    vec[5] += sign * latency
    vec[_H0 + hist_bucket(latency)] += sign


def record_rollups(
    conn: Connection,
    new: Iterable[Mapping[str, Any]],
    changed: Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]],
    spans: Iterable[Mapping[str, Any]],
    traces: Mapping[str, Mapping[str, Any]],
) -> None:
    """Add a write batch to the rollups: ``new`` trace rows, ``changed`` (before, after) pairs, and
    the TTFT of the batch's fresh ``spans`` (``traces`` maps their trace ids to the current rows).
    """
    # first per cube cell (minute, project, model, prompt, tags): a batch has few of them
    acc: dict[Cell, list[float]] = {}
    for t in new:
        _add(acc, t, 1)
    pairs = list(changed)
    fresh = [sp for sp in spans if sp.get("ttft_ms") is not None and sp.get("kind") == "llm"]
    earlier = _stored_ttft(conn, pairs, {(sp["trace_id"], sp["span_id"]) for sp in fresh})
    for before, after in pairs:
        _add(acc, before, -1)
        _add(acc, after, 1)
        moved = earlier.get(before["trace_id"])
        if moved:  # TTFT of spans written earlier follows its trace to the new cell
            _add_ttft(acc, before, -moved[0], -moved[1])
            _add_ttft(acc, after, moved[0], moved[1])
    for sp in fresh:
        _add_ttft(acc, traces[sp["trace_id"]], float(sp["ttft_ms"]), 1)
    _upsert(conn, acc)


def _add_ttft(acc: dict[Cell, list[float]], t: Mapping[str, Any], total: float, count: int) -> None:
    vec = _vec(acc, t)
    vec[_TTFT_SUM] += total
    vec[_TTFT_SUM + 1] += int(count)


def _stored_ttft(
    conn: Connection, pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]], fresh: set[tuple[str, str]]
) -> dict[str, tuple[float, int]]:
    """TTFT (sum, count) per changed trace of its LLM spans stored before this batch."""
    moving = [before["trace_id"] for before, after in pairs if _cell(before) != _cell(after)]
    if not moving:
        return {}
    out: dict[str, tuple[float, int]] = {}
    stmt = select(Span.trace_id, Span.span_id, Span.ttft_ms).where(
        Span.trace_id.in_(moving), Span.ttft_ms.is_not(None), Span.kind == "llm"
    )
    for tid, sid, ttft in conn.execute(stmt):
        if (tid, sid) not in fresh:
            total, count = out.get(tid, (0.0, 0))
            out[tid] = (total + float(ttft), count + 1)
    return out


def _upsert(conn: Connection, acc: dict[Cell, list[float]]) -> None:
    rows: dict[tuple[int, int, str, str, str], list[float]] = {}
    for (minute, project, model, prompt, tags, user, session), vec in acc.items():
        nonzero = [(i, v) for i, v in enumerate(vec) if v]  # a few of the 48 measures: add only those
        if not nonzero:  # a changed trace whose old and new contributions cancel
            continue
        members = [("all", ""), ("model", model), ("prompt", prompt), *(("tag", tag) for tag in tags)]
        coarse = [*members, *((d, m) for d, m in (("user", user), ("session", session)) if m)]
        for grain in GRAINS:
            bucket = minute // grain * grain
            for dim, member in coarse if grain in COARSE_GRAINS else members:
                key = (grain, bucket, project, dim, member)
                have = rows.get(key)
                if have is None:
                    have = rows[key] = list(_ZERO)
                for i, v in nonzero:
                    have[i] += v
    if not rows:
        return
    # integer measures stay Python ints (_ZERO), the three sums floats: no conversion per value here
    params = [(*key, *vec) for key, vec in sorted(rows.items())]
    conn.exec_driver_sql(_upsert_sql(conn.dialect.name), params)


_FLOATS = {MEASURES.index("cost_usd"), MEASURES.index("latency_sum_ms"), MEASURES.index("ttft_sum_ms")}
_ZERO: list[float] = [0.0 if i in _FLOATS else 0 for i in range(len(MEASURES))]
_SQL: dict[str, str] = {}


def _upsert_sql(dialect: str) -> str:
    sql = _SQL.get(dialect)
    if sql is None:
        cols = (*_KEY, *MEASURES)
        mark = "%s" if dialect == "postgresql" else "?"
        sets = ", ".join(f"{m} = metric_rollups.{m} + excluded.{m}" for m in MEASURES)
        sql = _SQL[dialect] = (
            f"INSERT INTO metric_rollups ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))}) "
            f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET {sets}"
        )
    return sql


def rebuild_rollups(conn: Connection, batch: int = 5000) -> int:
    """Recompute every rollup row from the traces and spans tables (for an upgrade, or a repair).

    Returns how many traces were read.
    """
    conn.execute(delete(MetricRollup))
    t = Trace.__table__.c
    trace_cols = [
        t.trace_id, t.start_time, t.project_id, t.model, t.prompt_name, t.prompt_version, t.tags,
        t.user_id, t.session_id, t.status, t.input_tokens, t.output_tokens, t.cost_usd, t.latency_ms,
    ]  # fmt: skip
    count = 0
    last = ""
    while True:
        rows = [
            dict(r._mapping)
            for r in conn.execute(
                select(*trace_cols).where(t.trace_id > last).order_by(t.trace_id).limit(batch)
            )
        ]
        if not rows:
            return count
        last = rows[-1]["trace_id"]
        by_id = {r["trace_id"]: r for r in rows}
        spans = [
            dict(s._mapping)
            for s in conn.execute(
                select(Span.trace_id, Span.span_id, Span.kind, Span.ttft_ms).where(
                    Span.trace_id.in_(list(by_id)), Span.ttft_ms.is_not(None)
                )
            )
        ]
        record_rollups(conn, rows, (), spans, by_id)
        count += len(rows)


def prune_minute_rows(engine: Engine, before: datetime, *, step: int = 3600) -> int:
    """Delete the minute rows (grain 60) of the metric and score rollups older than ``before``
    (from the start of its hour: the readers fall back to hour rows there), an hour of buckets per
    transaction so the trace writer is never held up for long. Returns how many rows went.
    """
    cut = _minute(before) // 3600 * 3600
    count = 0
    for model, dims in ((MetricRollup, MINUTE_DIMS), (ScoreRollup, ("all", "model", "prompt"))):
        c = model.__table__.c
        while True:
            with engine.begin() as conn:
                # every trace (score) has an ``all`` row: its oldest minute is the table's oldest
                oldest = conn.execute(
                    select(func.min(c.bucket)).where(c.dim == "all", c.grain == 60, c.bucket < cut)
                ).scalar()
                if oldest is None:
                    break
                a = int(oldest) // step * step
                res = conn.execute(
                    delete(model).where(
                        c.dim.in_(dims), c.grain == 60, c.bucket >= a, c.bucket < min(a + step, cut)
                    )
                )
                count += res.rowcount or 0
    return count
