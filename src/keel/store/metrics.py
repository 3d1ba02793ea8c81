"""Dashboard queries: requests, errors, latency, TTFT, tokens, cost and scores, over time and broken down.

Everything reads rollup tables (see ``models_rollups``): a query touches a few thousand rows
whatever the number of spans, because a time range is covered by day rows in its middle and hour
and minute rows at its edges. Users and sessions are rolled up by hour and day only (there are too
many for minute rows): the partial hours at a range's edges, and time series finer than an hour,
are aggregated from the indexed traces table (its TTFT sum and count included), so every number stays exact. Latency percentiles
everywhere come from a log-scale histogram (two buckets per doubling, interpolated inside the
bucket): approximate. The retention sweep may prune old minute rows: a summary whose range starts
or ends in such an hour is widened to the whole hour (finer-than-hour time series show nothing there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, case, func, literal, literal_column, or_, select, text, union_all

from keel.store.models import Trace
from keel.store.models_rollups import MetricRollup
from keel.store.rollups import COARSE_GRAINS, GRAINS, HIST_COLUMNS, hist_bounds

__all__ = [
    "GROUP_BYS",
    "INTERVALS",
    "METRICS",
    "Metrics",
    "MetricsError",
    "auto_interval",
    "hist_quantile",
    "hist_quantiles",
]

INTERVALS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "6h": 21600, "1d": 86400}
GROUP_BYS = ("model", "user", "session", "tag", "prompt_version")
METRICS = (
    "requests",
    "errors",
    "error_rate",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "latency_avg_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_avg_ms",
)
SCORE_GROUP_BYS = ("model", "prompt_version")
MAX_POINTS = 2000
TARGET_POINTS = 200
_ROLLUP_DIMS = {"model": "model", "prompt_version": "prompt", "tag": "tag"}
# many-valued dims: hour and day rollup rows, the traces table for partial hours
_MANY_DIMS = {"user": Trace.user_id, "session": Trace.session_id}
_SCORE_DIMS = {"model": "model", "prompt_version": "prompt"}
HOUR = 3600
_EPOCH = datetime(1970, 1, 1)


class MetricsError(ValueError):
    """A request the metrics queries cannot answer (bad interval, range too long for it, ...)."""


def hist_quantile(hist: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram, interpolated geometrically inside its bucket."""
    return hist_quantiles(hist, (q,))[0]


def hist_quantiles(hist: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    """Several quantiles (ascending ``qs``) of a latency histogram in one pass."""
    n = sum(hist)
    if n <= 0:
        return [None] * len(qs)
    out: list[float | None] = []
    ranks = [q * n for q in qs]
    cum = 0.0
    last = 0
    for k, c in enumerate(hist):
        if c <= 0:
            continue
        last = k
        while len(out) < len(ranks) and cum + c >= ranks[len(out)]:
            lo, hi = hist_bounds(k)
            frac = min(1.0, max(0.0, (ranks[len(out)] - cum) / c))
            out.append(lo + (hi - lo) * frac if k == 0 else lo * (hi / lo) ** frac)
        if len(out) == len(ranks):
            return out
        cum += c
    return out + [hist_bounds(last)[1]] * (len(ranks) - len(out))


def auto_interval(start: datetime, end: datetime) -> str:
    """The finest interval that draws the range in at most TARGET_POINTS buckets."""
    span = (end - start).total_seconds()
    for name, secs in INTERVALS.items():
        if span / secs <= TARGET_POINTS:
            return name
    return "1d"


def _epoch(dt: datetime) -> int:
    return int((dt - _EPOCH).total_seconds())


def _at(epoch: int) -> datetime:
    return _EPOCH + timedelta(seconds=epoch)


def _cover(start: int, end: int, grains: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split [start, end) into (grain, from, to) pieces: the coarsest aligned rows in the middle."""
    if start >= end:
        return []
    g = grains[-1]
    if len(grains) == 1:
        return [(g, start, end)]
    a, b = -(-start // g) * g, end // g * g
    if a >= b:
        return _cover(start, end, grains[:-1])
    return [*_cover(start, a, grains[:-1]), (g, a, b), *_cover(b, end, grains[:-1])]


@dataclass
class _Agg:
    """Sums of one group (or one bucket of one group), turned into the public metrics by ``row``."""

    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_sum_ms: float = 0.0
    ttft_sum_ms: float = 0.0
    ttft_count: int = 0
    hist: list[float] | None = None

    def add(self, other: _Agg) -> None:
        """Add another group's (or edge's) sums into this one."""
        self.requests += other.requests
        self.errors += other.errors
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd
        self.latency_sum_ms += other.latency_sum_ms
        self.ttft_sum_ms += other.ttft_sum_ms
        self.ttft_count += other.ttft_count
        if other.hist is not None:
            if self.hist is None:
                self.hist = [0.0] * len(HIST_COLUMNS)
            for k, c in enumerate(other.hist):
                self.hist[k] += c

    def row(self) -> dict[str, Any]:
        n = self.requests
        p50, p95, p99 = (
            hist_quantiles(self.hist, (0.5, 0.95, 0.99)) if n > 0 and self.hist else (None, None, None)
        )
        return {
            "requests": n,
            "errors": self.errors,
            "error_rate": None if n == 0 else self.errors / n,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "cost_usd": round(self.cost_usd, 9),
            "latency_avg_ms": None if n == 0 else round(self.latency_sum_ms / n, 3),
            "latency_p50_ms": _r3(p50),
            "latency_p95_ms": _r3(p95),
            "latency_p99_ms": _r3(p99),
            "ttft_avg_ms": None if self.ttft_count == 0 else round(self.ttft_sum_ms / self.ttft_count, 3),
        }


# the histogram bucket of traces.latency_ms in SQL (no log() in every SQLite build): see hist_bucket
_HIST_CASE = (
    "CASE "
    + " ".join(f"WHEN traces.latency_ms < {2.0 ** (k / 2)!r} THEN {k}" for k in range(len(HIST_COLUMNS) - 1))
    + f" ELSE {len(HIST_COLUMNS) - 1} END"
)


def _epoch_sql(dialect: str, col: str = "traces.start_time") -> str:
    """Epoch seconds of a naive-UTC DateTime column, in SQL."""
    if dialect == "postgresql":
        return f"CAST(EXTRACT(EPOCH FROM {col}) AS BIGINT)"
    return f"CAST(strftime('%s', {col}) AS INTEGER)"


def _r3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _agg_from_rollup(r: Any) -> _Agg:
    m = r._mapping
    return _Agg(
        requests=int(m["requests"] or 0),
        errors=int(m["errors"] or 0),
        input_tokens=int(m["input_tokens"] or 0),
        output_tokens=int(m["output_tokens"] or 0),
        cost_usd=float(m["cost_usd"] or 0.0),
        latency_sum_ms=float(m["latency_sum_ms"] or 0.0),
        ttft_sum_ms=float(m["ttft_sum_ms"] or 0.0),
        ttft_count=int(m["ttft_count"] or 0),
        hist=[float(m[h] or 0) for h in HIST_COLUMNS],
    )


def _member_label(member: str) -> str | None:
    return member or None


_SUMS = ", ".join(
    f"SUM({c}) AS {c}"
    for c in (
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
)


def _pieces_sql(pieces: Sequence[tuple[int, int, int]], params: dict[str, Any]) -> str:
    """``(grain = g AND bucket in [a, b)) OR ...`` for cover pieces, their values put in ``params``."""
    ors = []
    for i, (g, a, b) in enumerate(pieces):
        ors.append(f"(grain = {int(g)} AND bucket >= :a{i} AND bucket < :b{i})")
        params[f"a{i}"], params[f"b{i}"] = a, b
    return "(" + " OR ".join(ors) + ")"


def _split_hours(s: int, e: int) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
    """[s, e) as its whole hours (None when there are none) and the partial hours at its edges."""
    a, b = -(-s // HOUR) * HOUR, e // HOUR * HOUR
    if a >= b:
        return None, [(s, e)] if s < e else []
    return (a, b), [(x, y) for x, y in ((s, a), (b, e)) if x < y]


class Metrics:
    """The dashboard queries over one store's engine. Times are naive UTC; ranges are [start, end)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _oldest_minute(self, table: str) -> int | None:
        """The bucket of the oldest minute row of a rollup table (older ones are pruned, or were never)."""
        with self.engine.connect() as conn:
            # every trace has an ``all`` row: a seek on the (dim, grain, bucket) key
            v = conn.execute(
                text(f"SELECT MIN(bucket) FROM {table} WHERE dim = 'all' AND grain = 60")
            ).scalar()
        return None if v is None else int(v)

    def _whole_hours_where_pruned(self, s: int, e: int) -> tuple[int, int]:
        """Widen a partial hour at either end of [s, e) to the whole hour when it has no minute rows
        left (the retention sweep prunes whole hours): its hour row then answers exactly."""
        if s % HOUR == 0 and e % HOUR == 0:
            return s, e
        oldest = self._oldest_minute("metric_rollups")
        if oldest is None or s // HOUR * HOUR + HOUR <= oldest:
            s = s // HOUR * HOUR
        if oldest is None or e // HOUR * HOUR + HOUR <= oldest:
            e = -(-e // HOUR) * HOUR
        return s, e

    def _interval(self, interval: str | None, start: datetime, end: datetime) -> str:
        chosen = interval or auto_interval(start, end)
        if chosen not in INTERVALS:
            raise MetricsError(f"unknown interval {chosen!r}; one of {', '.join(INTERVALS)}")
        return chosen

    # -- rollup reads -----------------------------------------------------------------------------

    def _rollup_rows(
        self,
        *,
        dim: str,
        start: int,
        end: int,
        project_id: str | None,
        interval: int | None = None,
        members: Iterable[str] | None = None,
        limit: int | None = None,
        grains: Sequence[int] = GRAINS,
    ) -> list[Any]:
        grains = [g for g in grains if interval is None or interval % g == 0]
        pieces = _cover(start, end, grains)
        if not pieces:
            return []
        params: dict[str, Any] = {"dim": dim}
        where = [f"dim = :dim AND {_pieces_sql(pieces, params)}"]
        if project_id is not None:
            where.append("project_id = :project")
            params["project"] = project_id
        if members is not None:
            names = list(members)
            if not names:
                return []
            where.append("member IN (" + ", ".join(f":m{i}" for i in range(len(names))) + ")")
            params.update({f"m{i}": m for i, m in enumerate(names)})
        keys = "member"
        if interval is not None:
            keys = f"(bucket / {int(interval)}) * {int(interval)} AS tb, member"
        sql = f"SELECT {keys}, {_SUMS} FROM metric_rollups WHERE {' AND '.join(where)} GROUP BY "
        sql += "tb, member" if interval is not None else "member HAVING SUM(requests) > 0"
        if limit is not None and interval is None:
            sql += " ORDER BY SUM(requests) DESC, member LIMIT :limit"
            params["limit"] = limit
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    # -- users and sessions: hour and day rows, the traces table for partial hours ----------------

    def _many_top(self, dim: str, s: int, e: int, project_id: str | None, limit: int) -> list[str]:
        """The ``limit`` busiest users (or sessions) of [s, e), busiest first, ties by name."""
        col = _MANY_DIMS[dim]
        whole, edges = _split_hours(s, e)
        parts: list[Any] = []
        if whole is not None:
            r = MetricRollup.__table__.c
            pieces = _cover(whole[0], whole[1], COARSE_GRAINS)
            conds = [
                r.dim == dim,
                or_(*(and_(r.grain == g, r.bucket >= a, r.bucket < b) for g, a, b in pieces)),
            ]
            if project_id is not None:
                conds.append(r.project_id == project_id)
            parts.append(select(r.member.label("g"), r.requests.label("n")).where(*conds))
        for a, b in edges:
            conds = [Trace.start_time >= _at(a), Trace.start_time < _at(b), col.is_not(None)]
            if project_id is not None:
                conds.append(Trace.project_id == project_id)
            parts.append(select(col.label("g"), literal(1).label("n")).where(*conds))
        if not parts:
            return []
        u = union_all(*parts).subquery()
        total = func.sum(u.c.n)
        stmt = select(u.c.g).group_by(u.c.g).having(total > 0).order_by(total.desc(), u.c.g).limit(limit)
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(stmt)]

    def _many_aggs(
        self, dim: str, groups: list[str], s: int, e: int, project_id: str | None
    ) -> dict[str, _Agg]:
        """Whole-range sums of the given users (or sessions): rollup rows plus the partial hours."""
        out: dict[str, _Agg] = {g: _Agg(hist=[0.0] * len(HIST_COLUMNS)) for g in groups}
        whole, edges = _split_hours(s, e)
        if whole is not None:
            for r in self._rollup_rows(
                dim=dim,
                start=whole[0],
                end=whole[1],
                project_id=project_id,
                members=groups,
                grains=COARSE_GRAINS,
            ):
                out[r.member].add(_agg_from_rollup(r))
        for a, b in edges:
            for (g, _t), agg in self._raw_aggs(_MANY_DIMS[dim], groups, _at(a), _at(b), project_id).items():
                out[g].add(agg)
        return out

    def _raw_aggs(
        self,
        col: Any,
        groups: list[str],
        start: datetime,
        end: datetime,
        project_id: str | None,
        step: int | None = None,
    ) -> dict[tuple[str, int], _Agg]:
        """Sums, a latency histogram and TTFT per group (and per ``step`` bucket) from the traces table."""
        if not groups:
            return {}
        conds = [col.in_(groups), Trace.start_time >= start, Trace.start_time < end]
        if project_id is not None:
            conds.append(Trace.project_id == project_id)
        hb: Any = literal_column(_HIST_CASE).label("hb")
        tb: Any = literal_column(
            f"({_epoch_sql(self.engine.dialect.name)} / {int(step or 1)}) * {int(step or 1)}"
        ).label("tb")
        keys: list[Any] = [col.label("g"), hb] + ([tb] if step is not None else [])
        stmt = (
            select(
                *keys,
                func.count().label("n"),
                func.sum(case((Trace.status == "error", 1), else_=0)).label("errors"),
                func.sum(Trace.input_tokens).label("input_tokens"),
                func.sum(Trace.output_tokens).label("output_tokens"),
                func.sum(Trace.cost_usd).label("cost_usd"),
                func.sum(Trace.latency_ms).label("latency"),
                func.sum(Trace.ttft_sum_ms).label("ttft_total"),
                func.sum(Trace.ttft_count).label("ttft_n"),
            )
            .where(and_(*conds))
            .group_by(*keys)
        )
        out: dict[tuple[str, int], _Agg] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(stmt):
                key = (r.g, int(r.tb) if step is not None else 0)
                agg = out.get(key)
                if agg is None:
                    agg = out[key] = _Agg(hist=[0.0] * len(HIST_COLUMNS))
                agg.requests += int(r.n)
                agg.errors += int(r.errors or 0)
                agg.input_tokens += int(r.input_tokens or 0)
                agg.output_tokens += int(r.output_tokens or 0)
                agg.cost_usd += float(r.cost_usd or 0.0)
                agg.latency_sum_ms += float(r.latency or 0.0)
                assert agg.hist is not None
                agg.hist[int(r.hb)] += int(r.n)
                agg.ttft_sum_ms += float(r.ttft_total or 0.0)
                agg.ttft_count += int(r.ttft_n or 0)
        return out

    # -- public queries ---------------------------------------------------------------------------

    def summary(
        self,
        *,
        start: datetime,
        end: datetime,
        project_id: str | None = None,
        group_by: str | None = None,
        limit: int = 10,
    ) -> dict[str, Any]:
        """Totals over [start, end) (widened to whole minutes; to whole hours where minute rows were
        pruned) and, with ``group_by``, the top groups."""
        if group_by is not None and group_by not in GROUP_BYS:
            raise MetricsError(f"cannot group by {group_by!r}; one of {', '.join(GROUP_BYS)}")
        s, e = _epoch(start) // 60 * 60, -(-_epoch(end) // 60) * 60
        if e <= s:
            raise MetricsError("'end' must be after 'start'")
        s, e = self._whole_hours_where_pruned(s, e)
        totals = self._rollup_rows(dim="all", start=s, end=e, project_id=project_id)
        out: dict[str, Any] = {
            "start": _at(s),
            "end": _at(e),
            "group_by": group_by,
            "totals": (_agg_from_rollup(totals[0]) if totals else _Agg()).row(),
            "groups": [],
        }
        if group_by in _ROLLUP_DIMS:
            dim = _ROLLUP_DIMS[group_by]
            rows = self._rollup_rows(dim=dim, start=s, end=e, project_id=project_id, limit=limit)
            out["groups"] = [{"group": _member_label(r.member), **_agg_from_rollup(r).row()} for r in rows]
        elif group_by in _MANY_DIMS:
            top = self._many_top(group_by, s, e, project_id, limit)
            aggs = self._many_aggs(group_by, top, s, e, project_id)
            out["groups"] = [{"group": g, **aggs[g].row()} for g in top]
        return out

    def timeseries(
        self,
        *,
        start: datetime,
        end: datetime,
        interval: str | None = None,
        project_id: str | None = None,
        group_by: str | None = None,
        limit: int = 5,
    ) -> dict[str, Any]:
        """Every metric per time bucket: one series, or one per top group (by requests) with ``group_by``.

        Buckets are aligned to multiples of the interval (UTC); the range is widened to whole buckets
        and every bucket is present (zero requests where nothing happened).
        """
        if group_by is not None and group_by not in GROUP_BYS:
            raise MetricsError(f"cannot group by {group_by!r}; one of {', '.join(GROUP_BYS)}")
        interval = self._interval(interval, start, end)
        step = INTERVALS[interval]
        s, e = _epoch(start) // step * step, -(-_epoch(end) // step) * step
        if e <= s:
            raise MetricsError("'end' must be after 'start'")
        if (e - s) // step > MAX_POINTS:
            raise MetricsError(
                f"{(e - s) // step} points of {interval} is more than {MAX_POINTS}; use a coarser interval"
            )
        buckets = list(range(s, e, step))
        series: dict[str | None, dict[int, _Agg]] = {}
        if group_by in _MANY_DIMS:
            top = self._many_top(group_by, s, e, project_id, limit)
            series = {g: {} for g in top}
            if step % HOUR == 0:  # whole hours: the rollup rows alone
                for r in self._rollup_rows(
                    dim=group_by, start=s, end=e, project_id=project_id, interval=step, members=top,
                    grains=COARSE_GRAINS,
                ):  # fmt: skip
                    series[r.member][int(r.tb)] = _agg_from_rollup(r)
            else:
                col = _MANY_DIMS[group_by]
                for (g, t), agg in self._raw_aggs(col, top, _at(s), _at(e), project_id, step).items():
                    series[g][t] = agg
        else:
            dim = "all" if group_by is None else _ROLLUP_DIMS[group_by]
            members: list[str] | None = None
            if group_by is not None:
                ranked = self._rollup_rows(dim=dim, start=s, end=e, project_id=project_id, limit=limit)
                members = [r.member for r in ranked]
                series = {_member_label(m): {} for m in members}
            else:
                series = {None: {}}
            for r in self._rollup_rows(
                dim=dim, start=s, end=e, project_id=project_id, interval=step, members=members
            ):
                series[_member_label(r.member)][int(r.tb)] = _agg_from_rollup(r)
        return {
            "start": _at(s),
            "end": _at(e),
            "interval": interval,
            "group_by": group_by,
            "series": [
                {"group": g, "points": [{"t": _at(t), **points.get(t, _Agg()).row()} for t in buckets]}
                for g, points in series.items()
            ],
        }

    def scores(
        self,
        *,
        start: datetime,
        end: datetime,
        interval: str | None = None,
        project_id: str | None = None,
        name: str | None = None,
        group_by: str | None = None,
    ) -> dict[str, Any]:
        """Per score name: count, mean/min/max (numeric and boolean), label counts (categorical), the
        mean per time bucket, and with ``group_by`` (model or prompt_version) the mean per group.
        Scores are placed in time by when they were created. Read from the score rollups.
        """
        if group_by is not None and group_by not in SCORE_GROUP_BYS:
            raise MetricsError(f"cannot group scores by {group_by!r}; one of {', '.join(SCORE_GROUP_BYS)}")
        interval = self._interval(interval, start, end)
        step = INTERVALS[interval]
        s, e = _epoch(start) // step * step, -(-_epoch(end) // step) * step
        if e <= s:
            raise MetricsError("'end' must be after 'start'")
        if (e - s) // step > MAX_POINTS:
            raise MetricsError(
                f"{(e - s) // step} points of {interval} is more than {MAX_POINTS}; use a coarser interval"
            )
        params: dict[str, Any] = {}
        pieces = _cover(s, e, [g for g in GRAINS if step % g == 0])
        where = [_pieces_sql(pieces, params)]
        if project_id is not None:
            where.append("project_id = :project")
            params["project"] = project_id
        if name is not None:
            where.append("name = :name")
            params["name"] = name
        cells = text(
            f"SELECT name, data_type, label, (bucket / {step}) * {step} AS tb, SUM(n) AS n, SUM(nv) AS nv, "
            "SUM(total) AS total, MIN(vmin) AS min, MAX(vmax) AS max FROM score_rollups "
            f"WHERE dim = 'all' AND {' AND '.join(where)} GROUP BY name, data_type, label, tb"
        )
        out: dict[str, dict[str, Any]] = {}
        sums: dict[str, list[float]] = {}  # name -> [count of values, sum of values]
        buckets: dict[str, dict[int, list[float]]] = {}  # name -> bucket -> [count, count of values, sum]
        with self.engine.connect() as conn:
            for r in conn.execute(cells, params):
                n, nv, total = int(r.n or 0), int(r.nv or 0), float(r.total or 0.0)
                if n <= 0:
                    continue
                item = out.get(r.name)
                if item is None:
                    item = out[r.name] = {
                        "name": r.name,
                        "data_type": r.data_type,
                        "count": 0,
                        "avg": None,
                        "min": None,
                        "max": None,
                        "labels": {},
                        "points": [],
                        "groups": [],
                    }
                    sums[r.name] = [0, 0.0]
                item["count"] += n
                if r.data_type == "categorical":
                    item["labels"][r.label] = item["labels"].get(r.label, 0) + n
                if nv:
                    sums[r.name][0] += nv
                    sums[r.name][1] += total
                    if r.min is not None:
                        lo, hi = float(r.min), float(r.max)
                        item["min"] = lo if item["min"] is None else min(item["min"], lo)
                        item["max"] = hi if item["max"] is None else max(item["max"], hi)
                cell = buckets.setdefault(r.name, {}).setdefault(int(r.tb), [0, 0, 0.0])
                cell[0] += n
                cell[1] += nv
                cell[2] += total
            if group_by is not None:
                grouped = text(
                    "SELECT name, member, SUM(n) AS n, SUM(nv) AS nv, SUM(total) AS total FROM score_rollups "
                    f"WHERE dim = :dim AND {' AND '.join(where)} GROUP BY name, member HAVING SUM(n) > 0 "
                    "ORDER BY name, SUM(n) DESC, member"
                )
                for r in conn.execute(grouped, {**params, "dim": _SCORE_DIMS[group_by]}):
                    if r.name in out:
                        nv = int(r.nv or 0)
                        out[r.name]["groups"].append(
                            {
                                "group": r.member or None,
                                "count": int(r.n),
                                "avg": float(r.total) / nv if nv else None,
                            }
                        )
        for nm, item in out.items():
            values, value_sum = sums[nm]
            item["avg"] = value_sum / values if values else None
            have = buckets.get(nm, {})
            item["points"] = []
            for t in range(s, e, step):
                cnt, cnt_v, tot = have.get(t, (0, 0, 0.0))
                item["points"].append({"t": _at(t), "count": int(cnt), "avg": tot / cnt_v if cnt_v else None})
        return {
            "start": _at(s),
            "end": _at(e),
            "interval": interval,
            "group_by": group_by,
            "scores": sorted(out.values(), key=lambda x: x["name"]),
        }
