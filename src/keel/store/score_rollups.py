"""Keeping the score rollups current: called wherever scores are inserted or deleted.

A score counts in the minute it was created, under its own project and name, three times: once in
the ``all`` dim (per categorical label, with min and max of the values), once under the model of
its trace and once under the trace's prompt ``name@version``. Counts and sums are added and
subtracted exactly; when a delete may take a row's min or max away, the row's min and max are
read again from the scores table. When later spans change a scored trace's model or prompt
version, the trace writer moves its scores' contributions (``move_trace_scores``). Like the
metric rollups, score rollups outlive trace retention.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, select, update

from keel.store.models import Score, Trace
from keel.store.models_rollups import ScoreRollup
from keel.store.rollups import GRAINS, prompt_member

__all__ = ["SCORE_DIMS", "move_trace_scores", "rebuild_score_rollups", "record_scores", "trace_members"]

SCORE_DIMS = ("all", "model", "prompt")
_EPOCH = datetime(1970, 1, 1)
_KEY = ("grain", "bucket", "project_id", "name", "data_type", "dim", "member", "label")

Members = tuple[str, str]  # (model, prompt member) of a trace
Key = tuple[int, int, str, str, str, str, str, str]


def _minute(dt: datetime) -> int:
    return int((dt - _EPOCH).total_seconds()) // 60 * 60


def trace_members(conn: Connection, trace_ids: Iterable[str], *, lock: bool = False) -> dict[str, Members]:
    """(model, prompt member) of each stored trace; ``lock`` holds the rows (PostgreSQL) so the
    trace writer cannot move the trace's scores in between."""
    ids = list(set(trace_ids))
    if not ids:
        return {}
    stmt = select(Trace.trace_id, Trace.model, Trace.prompt_name, Trace.prompt_version).where(
        Trace.trace_id.in_(ids)
    )
    if lock:
        stmt = stmt.with_for_update()
    return {r[0]: (r[1] or "", prompt_member(r[2], r[3])) for r in conn.execute(stmt)}


def _add(
    acc: dict[Key, list[Any]], sc: Mapping[str, Any], dims: Iterable[tuple[str, str]], sign: int
) -> None:
    minute = _minute(sc["created_at"])
    value = sc.get("value")
    for grain in GRAINS:
        bucket = minute // grain * grain
        for dim, member in dims:
            label = (sc.get("string_value") or "") if dim == "all" else ""
            key = (grain, bucket, sc.get("project_id") or "", sc["name"], sc["data_type"], dim, member, label)
            vec = acc.get(key)
            if vec is None:
                vec = acc[key] = [0, 0, 0.0, None, None]
            vec[0] += sign
            if value is not None:
                vec[1] += sign
                vec[2] += sign * float(value)
                if sign > 0 and dim == "all":
                    vec[3] = value if vec[3] is None else min(vec[3], value)
                    vec[4] = value if vec[4] is None else max(vec[4], value)


def record_scores(
    conn: Connection, scores: Iterable[Mapping[str, Any]], members: Mapping[str, Members], sign: int = 1
) -> None:
    """Add (``sign=1``) or take away (``sign=-1``, after the rows are deleted) scores (dicts of
    the scores columns); ``members`` maps their trace ids to the traces' (model, prompt member).
    """
    acc: dict[Key, list[Any]] = {}
    for sc in scores:
        model, prompt = members.get(sc["trace_id"], ("", ""))
        _add(acc, sc, (("all", ""), ("model", model), ("prompt", prompt)), sign)
    _upsert(conn, acc)
    if sign < 0:
        _refresh_min_max(conn, [k for k in acc if k[5] == "all"])


def move_trace_scores(conn: Connection, moves: Mapping[str, tuple[Members, Members]]) -> None:
    """Move the scores of traces whose (model, prompt member) changed from the old to the new one."""
    moving = {tid: m for tid, m in moves.items() if m[0] != m[1]}
    if not moving:
        return
    acc: dict[Key, list[Any]] = {}
    stmt = select(*_SCORE_COLS).where(Score.trace_id.in_(list(moving)))
    for r in conn.execute(stmt):
        sc = dict(r._mapping)
        (old_model, old_prompt), (new_model, new_prompt) = moving[sc["trace_id"]]
        _add(acc, sc, (("model", old_model), ("prompt", old_prompt)), -1)
        _add(acc, sc, (("model", new_model), ("prompt", new_prompt)), 1)
    _upsert(conn, acc)


_SCORE_COLS = (
    Score.trace_id,
    Score.project_id,
    Score.name,
    Score.data_type,
    Score.value,
    Score.string_value,
    Score.created_at,
)


def _upsert(conn: Connection, acc: dict[Key, list[Any]]) -> None:
    rows = sorted((k, v) for k, v in acc.items() if v[0] or v[1] or v[2])  # one lock order for all writers
    if not rows:
        return
    conn.exec_driver_sql(_upsert_sql(conn.dialect.name), [(*k, *v) for k, v in rows])
    emptied = [k for k, v in rows if v[0] < 0]
    if emptied:  # rows that may have lost their last score: gone, so a name without scores is not listed
        t = ScoreRollup.__table__.c
        conn.execute(
            delete(ScoreRollup).where(
                t.grain == bindparam("k_g"),
                t.bucket == bindparam("k_b"),
                t.project_id == bindparam("k_p"),
                t.name == bindparam("k_n"),
                t.data_type == bindparam("k_d"),
                t.dim == bindparam("k_dim"),
                t.member == bindparam("k_m"),
                t.label == bindparam("k_l"),
                t.n <= 0,
            ),
            [dict(zip(_DEL_KEYS, k, strict=True)) for k in emptied],
        )


def _refresh_min_max(conn: Connection, keys: list[Key]) -> None:
    """Read min and max of ``all`` rows again from the scores table (a delete may have taken them)."""
    for grain, bucket, project, name, data_type, _dim, _member, label in keys:
        start = _EPOCH + timedelta(seconds=bucket)
        conds = [
            Score.project_id.is_(None) if project == "" else Score.project_id == project,
            Score.name == name,
            Score.data_type == data_type,
            func.coalesce(Score.string_value, "") == label,
            Score.created_at >= start,
            Score.created_at < start + timedelta(seconds=grain),
        ]
        lo, hi = conn.execute(select(func.min(Score.value), func.max(Score.value)).where(and_(*conds))).one()
        t = ScoreRollup.__table__.c
        conn.execute(
            update(ScoreRollup)
            .where(
                t.grain == grain,
                t.bucket == bucket,
                t.project_id == project,
                t.name == name,
                t.data_type == data_type,
                t.dim == "all",
                t.member == "",
                t.label == label,
            )
            .values(vmin=lo, vmax=hi)
        )


_DEL_KEYS = ("k_g", "k_b", "k_p", "k_n", "k_d", "k_dim", "k_m", "k_l")
_SQL: dict[str, str] = {}


def _upsert_sql(dialect: str) -> str:
    sql = _SQL.get(dialect)
    if sql is None:
        cols = (*_KEY, "n", "nv", "total", "vmin", "vmax")
        mark = "%s" if dialect == "postgresql" else "?"
        r = "score_rollups"
        sets = ", ".join(f"{c} = {r}.{c} + excluded.{c}" for c in ("n", "nv", "total"))
        sets += (
            f", vmin = CASE WHEN excluded.vmin IS NOT NULL AND ({r}.vmin IS NULL OR excluded.vmin < {r}.vmin)"
            f" THEN excluded.vmin ELSE {r}.vmin END"
            f", vmax = CASE WHEN excluded.vmax IS NOT NULL AND ({r}.vmax IS NULL OR excluded.vmax > {r}.vmax)"
            f" THEN excluded.vmax ELSE {r}.vmax END"
        )
        sql = _SQL[dialect] = (
            f"INSERT INTO {r} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))}) "
            f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET {sets}"
        )
    return sql


def rebuild_score_rollups(conn: Connection, batch: int = 5000) -> int:
    """Recompute every score rollup row from the scores and traces tables. Returns the scores read."""
    conn.execute(delete(ScoreRollup))
    count = 0
    last = ""
    while True:
        rows = [
            dict(r._mapping)
            for r in conn.execute(
                select(Score.id, *_SCORE_COLS).where(Score.id > last).order_by(Score.id).limit(batch)
            )
        ]
        if not rows:
            return count
        last = rows[-1]["id"]
        record_scores(conn, rows, trace_members(conn, (r["trace_id"] for r in rows)))
        count += len(rows)
