"""Dashboards' numbers: /api/metrics/summary, /timeseries and /scores over the rollups and the traces table.

Runs on both backends (the ``keel`` fixture). Each test writes its traces into its own project
through the store's trace-writer path (write_spans, which maintains the rollups), at fixed past
times, so other tests' traffic never shows up in its numbers.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import bindparam, event, text

from keel.store import Store, TraceFilter
from keel.store.metrics import Metrics, _cover, hist_quantile, hist_quantiles
from keel.store.models import JSONVariant
from keel.store.repo import _encode_cursor
from keel.store.rollups import HIST_COLUMNS, hist_bounds, hist_bucket, prune_minute_rows, rebuild_rollups
from keel.store.score_rollups import rebuild_score_rollups
from keel.store.scores import add_score, delete_score, insert_scores
from tests.conftest import BACKENDS, Keel, make_keel

T0 = datetime(2024, 3, 10, 10, 0)
SQRT2 = math.sqrt(2.0)


@pytest.fixture(scope="module", params=BACKENDS)
def keel(
    request: pytest.FixtureRequest, mock_upstream: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    """The shared keel set-up, with minute rollups never pruned: these tests write at fixed past times
    (the retention sweep at start-up would otherwise prune their minute rows; pruning has its own test)."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"keel-{backend}")
    server, app = make_keel(backend, tmp, mock_upstream, request, rollup_minute_days=0.0)
    k = Keel(server, app, backend)
    try:
        yield k
    finally:
        k.http.close()
        server.stop()


# -- data ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One single-span trace of the dataset, with what the metrics should count for it."""

    i: int
    trace_id: str
    start: datetime
    latency: float
    model: str
    prompt: tuple[str, int] | None
    tags: list[str]
    user: str
    session: str
    error: bool
    inp: int
    out: int
    cost: float
    ttft: float | None


def make_rows(n: int = 40, t0: datetime = T0) -> list[Row]:
    rows = []
    for i in range(n):
        rows.append(
            Row(
                i=i,
                trace_id=uuid.uuid4().hex,
                start=t0 + timedelta(seconds=90 * i),
                latency=100.0 + 10 * i,
                model="m-a" if i % 2 == 0 else "m-b",
                prompt=("greet", 1) if i % 4 == 0 else ("greet", 2) if i % 4 == 1 else None,
                tags=["vip", "beta"] if i % 5 == 0 else ["vip"] if i % 5 == 1 else [],
                user=f"u{i % 3}",
                session=f"s{i % 7}",
                error=i % 10 == 3,
                inp=10 + i,
                out=2 * i,
                cost=0.001 * (i + 1),
                ttft=20.0 + i if i % 2 == 0 else None,
            )
        )
    return rows


def span_of(r: Row, project_id: str) -> dict[str, Any]:
    return {
        "trace_id": r.trace_id,
        "span_id": "a" * 16,
        "parent_span_id": None,
        "project_id": project_id,
        "name": "chat " + r.model,
        "kind": "llm",
        "start_time": r.start,
        "end_time": r.start + timedelta(milliseconds=r.latency),
        "latency_ms": r.latency,
        "ttft_ms": r.ttft,
        "status": "error" if r.error else "ok",
        "error": "upstream 500" if r.error else None,
        "model": r.model + "-2024",
        "requested_model": r.model,
        "provider": "openai",
        "input_tokens": r.inp,
        "output_tokens": r.out,
        "cost_usd": r.cost,
        "user": r.user,
        "session_id": r.session,
        "prompt_name": r.prompt[0] if r.prompt else None,
        "prompt_version": r.prompt[1] if r.prompt else None,
        "tags": r.tags or None,
    }


def exact_quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def expected(rows: list[Row]) -> dict[str, Any]:
    n = len(rows)
    errors = sum(r.error for r in rows)
    ttfts = [r.ttft for r in rows if r.ttft is not None]
    return {
        "requests": n,
        "errors": errors,
        "error_rate": errors / n,
        "input_tokens": sum(r.inp for r in rows),
        "output_tokens": sum(r.out for r in rows),
        "total_tokens": sum(r.inp + r.out for r in rows),
        "cost_usd": pytest.approx(sum(r.cost for r in rows)),
        "latency_avg_ms": pytest.approx(sum(r.latency for r in rows) / n, abs=1e-3),
        "ttft_avg_ms": pytest.approx(sum(ttfts) / len(ttfts), abs=1e-3) if ttfts else None,
    }


def assert_close_percentiles(got: dict[str, Any], latencies: list[float]) -> None:
    """Histogram percentiles are within one bucket (a factor of sqrt 2) of the exact ones."""
    for key, q in (("latency_p50_ms", 0.5), ("latency_p95_ms", 0.95), ("latency_p99_ms", 0.99)):
        exact = exact_quantile(latencies, q)
        assert exact / SQRT2 <= got[key] <= exact * SQRT2, (key, got[key], exact)


@dataclass
class Dataset:
    project: str
    project_id: str
    rows: list[Row]


@pytest.fixture(scope="module")
def data(keel: Any) -> Dataset:
    name = "metrics-" + uuid.uuid4().hex[:8]
    pid = keel.store.ensure_project(name)
    rows = make_rows()
    keel.store.write_spans([span_of(r, pid) for r in rows[:25]])
    keel.store.write_spans([span_of(r, pid) for r in rows[20:]])  # overlapping batch: no double count
    return Dataset(name, pid, rows)


def window(**extra: Any) -> dict[str, Any]:
    return {"start": "2024-03-10T09:00:00Z", "end": "2024-03-10T12:00:00Z", **extra}


# -- pure functions -----------------------------------------------------------------------------


def test_histogram_buckets_and_quantiles() -> None:
    assert hist_bucket(0.0) == 0 and hist_bucket(0.99) == 0 and hist_bucket(float("nan")) == 0
    assert hist_bucket(1.0) == 1 and hist_bucket(1.5) == 2 and hist_bucket(2.0) == 3
    assert hist_bucket(10**9) == len(HIST_COLUMNS) - 1
    for ms in (0.5, 1.0, 3.3, 150.0, 999.0, 12_345.0, 400_000.0):
        lo, hi = hist_bounds(hist_bucket(ms))
        assert lo <= ms < hi
    hist = [0.0] * len(HIST_COLUMNS)
    hist[hist_bucket(200.0)] = 100
    lo, hi = hist_bounds(hist_bucket(200.0))
    assert lo <= hist_quantile(hist, 0.5) <= hi  # type: ignore[operator]
    assert hist_quantile([0.0] * len(HIST_COLUMNS), 0.5) is None


def test_range_cover_uses_coarse_rows_in_the_middle() -> None:
    day, hour = 86400, 3600
    start, end = 2 * day - 90 * 60, 4 * day + hour + 120
    pieces = _cover(start, end, (60, 3600, 86400))
    assert (86400, 2 * day, 4 * day) in pieces
    assert (3600, 2 * day - hour, 2 * day) in pieces and (3600, 4 * day, 4 * day + hour) in pieces
    assert (60, 2 * day - 90 * 60, 2 * day - hour) in pieces and (60, 4 * day + hour, end) in pieces
    covered = sorted((a, b) for _, a, b in pieces)
    assert covered[0][0] == start and covered[-1][1] == end
    assert all(covered[k][1] == covered[k + 1][0] for k in range(len(covered) - 1))


# -- summary -------------------------------------------------------------------------------------


def test_summary_totals_match_the_traces(keel: Any, data: Dataset) -> None:
    r = keel.http.get("/api/metrics/summary", params=window(project=data.project))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["start"] == "2024-03-10T09:00:00Z" and body["end"] == "2024-03-10T12:00:00Z"
    assert body["groups"] == [] and body["group_by"] is None
    totals = body["totals"]
    assert totals == {**totals, **expected(data.rows)}
    assert_close_percentiles(totals, [r.latency for r in data.rows])

    # a narrower window (minutes 0..29: traces 0..19) is exact too: minute rows at the edges
    r = keel.http.get(
        "/api/metrics/summary",
        params={"project": data.project_id, "start": "2024-03-10T10:00:00", "end": "2024-03-10T10:30:00"},
    )
    assert r.json()["totals"]["requests"] == 20
    assert r.json()["totals"]["input_tokens"] == sum(x.inp for x in data.rows[:20])

    empty = keel.http.get(
        "/api/metrics/summary",
        params={"project": data.project, "start": "2023-01-01T00:00:00Z", "end": "2023-01-02T00:00:00Z"},
    ).json()["totals"]
    assert empty["requests"] == 0 and empty["error_rate"] is None and empty["latency_p95_ms"] is None


@pytest.mark.parametrize("group_by", ["model", "prompt_version", "tag", "user", "session"])
def test_summary_breakdowns(keel: Any, data: Dataset, group_by: str) -> None:
    r = keel.http.get(
        "/api/metrics/summary", params=window(project=data.project, group_by=group_by, limit=50)
    )
    assert r.status_code == 200, r.text
    groups = {g["group"]: g for g in r.json()["groups"]}

    def key_of(row: Row) -> list[str | None]:
        if group_by == "model":
            return [row.model]
        if group_by == "prompt_version":
            return [f"{row.prompt[0]}@{row.prompt[1]}" if row.prompt else None]
        if group_by == "tag":
            return list(row.tags) or [None]
        return [row.user if group_by == "user" else row.session]

    want: dict[str | None, list[Row]] = {}
    for row in data.rows:
        for k in key_of(row):
            want.setdefault(k, []).append(row)
    assert set(groups) == set(want)
    counts = [g["requests"] for g in r.json()["groups"]]
    assert counts == sorted(counts, reverse=True)  # busiest first
    for k, rows in want.items():
        exp = expected(rows)
        got = groups[k]
        assert got == {**got, **exp}, k
        assert_close_percentiles(got, [x.latency for x in rows])

    top = keel.http.get(
        "/api/metrics/summary", params=window(project=data.project, group_by=group_by, limit=1)
    )
    assert len(top.json()["groups"]) == 1 and top.json()["groups"][0]["requests"] == max(counts)


# -- time series ---------------------------------------------------------------------------------


def test_timeseries_buckets(keel: Any, data: Dataset) -> None:
    r = keel.http.get(
        "/api/metrics/timeseries",
        params={
            "project": data.project,
            "metric": "requests",
            "interval": "15m",
            "start": "2024-03-10T09:50:00Z",
            "end": "2024-03-10T11:05:00Z",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # widened to whole intervals, every bucket present
    assert body["start"] == "2024-03-10T09:45:00Z" and body["end"] == "2024-03-10T11:15:00Z"
    assert body["interval"] == "15m" and body["metric"] == "requests" and len(body["series"]) == 1
    points = body["series"][0]["points"]
    assert [p["t"] for p in points] == [
        f"2024-03-10T{h:02d}:{m:02d}:00Z"
        for h, m in ((9, 45), (10, 0), (10, 15), (10, 30), (10, 45), (11, 0))
    ]
    per_bucket = [0] * 6
    for row in data.rows:
        per_bucket[1 + (row.start - T0).seconds // 900] += 1
    assert [p["value"] for p in points] == per_bucket

    r = keel.http.get(
        "/api/metrics/timeseries",
        params={**window(project=data.project), "metric": "error_rate", "interval": "1h"},
    )
    values = [p["value"] for p in r.json()["series"][0]["points"]]
    assert values == [None, pytest.approx(sum(x.error for x in data.rows) / 40), None]

    r = keel.http.get(
        "/api/metrics/timeseries",
        params={**window(project=data.project), "metric": "cost_usd", "interval": "1d", "group_by": "model"},
    )
    series = {s["group"]: s["points"] for s in r.json()["series"]}
    assert set(series) == {"m-a", "m-b"}
    assert series["m-a"] == [
        {
            "t": "2024-03-10T00:00:00Z",
            "value": pytest.approx(sum(x.cost for x in data.rows if x.model == "m-a")),
        }
    ]

    r = keel.http.get(
        "/api/metrics/timeseries",
        params={**window(project=data.project), "metric": "latency_p95_ms", "group_by": "user", "limit": 2},
    )
    body = r.json()
    assert body["interval"] == "1m"  # default: the finest interval with at most 200 points
    assert len(body["series"]) == 2
    for s in body["series"]:
        mine = [x for x in data.rows if x.user == s["group"]]
        by_t = {p["t"]: p["value"] for p in s["points"] if p["value"] is not None}
        assert set(by_t) == {x.start.strftime("%Y-%m-%dT%H:%M:00Z") for x in mine}
        for x in mine:  # one trace per minute: its latency, within its histogram bucket
            assert x.latency / SQRT2 <= by_t[x.start.strftime("%Y-%m-%dT%H:%M:00Z")] <= x.latency * SQRT2


def test_late_spans_move_a_trace_without_double_counting(keel: Any) -> None:
    pid = keel.store.ensure_project("metrics-late-" + uuid.uuid4().hex[:8])
    t0 = datetime(2024, 4, 1, 8, 30)
    tid = uuid.uuid4().hex
    child = {
        "trace_id": tid,
        "span_id": "c" * 16,
        "parent_span_id": "p" * 16,
        "project_id": pid,
        "name": "llm call",
        "kind": "llm",
        "start_time": t0,
        "end_time": t0 + timedelta(milliseconds=400),
        "latency_ms": 400.0,
        "ttft_ms": 50.0,
        "status": "ok",
        "requested_model": "m-late",
        "input_tokens": 7,
        "output_tokens": 3,
        "cost_usd": 0.5,
        "tags": ["first"],
    }
    keel.store.write_spans([child])
    # the parent arrives later: it starts two minutes earlier, fails, and carries a prompt and a tag
    parent = {
        **child,
        "span_id": "p" * 16,
        "parent_span_id": None,
        "name": "agent run",
        "kind": "agent",
        "start_time": t0 - timedelta(minutes=2),
        "end_time": t0 + timedelta(seconds=1),
        "latency_ms": 121_000.0,
        "ttft_ms": None,
        "status": "error",
        "requested_model": None,
        "input_tokens": None,
        "output_tokens": None,
        "cost_usd": None,
        "prompt_name": "plan",
        "prompt_version": 3,
        "tags": ["second"],
    }
    keel.store.write_spans([parent])
    keel.store.write_spans([parent, child])  # a retried batch changes nothing

    def summary(group_by: str | None = None, **p: str) -> dict[str, Any]:
        params = {"project": pid, "start": "2024-04-01T08:00:00Z", "end": "2024-04-01T09:00:00Z", **p}
        if group_by:
            params["group_by"] = group_by
        out: dict[str, Any] = keel.http.get("/api/metrics/summary", params=params).json()
        return out

    totals = summary()["totals"]
    assert totals["requests"] == 1 and totals["errors"] == 1
    assert totals["input_tokens"] == 7 and totals["cost_usd"] == pytest.approx(0.5)
    assert totals["latency_avg_ms"] == pytest.approx(121_000.0)
    assert totals["ttft_avg_ms"] == pytest.approx(50.0)
    assert 121_000 / SQRT2 <= totals["latency_p50_ms"] <= 121_000 * SQRT2
    # the trace moved to the parent's minute: nothing is left in the child's
    assert summary(start="2024-04-01T08:30:00Z")["totals"]["requests"] == 0
    assert summary(end="2024-04-01T08:29:00Z")["totals"]["requests"] == 1
    assert [(g["group"], g["requests"]) for g in summary("prompt_version")["groups"]] == [("plan@3", 1)]
    assert [(g["group"], g["requests"]) for g in summary("model")["groups"]] == [("m-late", 1)]
    assert sorted((g["group"], g["requests"]) for g in summary("tag")["groups"]) == [
        ("first", 1),
        ("second", 1),
    ]


def _fresh_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Any, *, migrate: bool = True
) -> Iterator[Store]:
    if backend == "sqlite":
        store = Store.from_url(f"sqlite:///{tmp_path}/rebuild.db", run_migrations=migrate)
        yield store
        store.close()
        return
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    name = "keel_rollups_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        store = Store.from_url(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name, run_migrations=migrate)
        yield store
        store.close()
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_rebuild_reproduces_the_incremental_rollups(
    keel: Any, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """Rollups kept batch by batch (with late spans) equal a recomputation from the traces table; score
    rollups kept score by score equal a recomputation from the scores table."""
    for store in _fresh_store(keel.backend, request, tmp_path):
        rows = make_rows(60, datetime(2024, 5, 1, 23, 10))  # crosses midnight: day rows on both sides
        spans = [span_of(r, "proj_a" if r.i % 3 else "proj_b") for r in rows]
        late = [
            {**sp, "span_id": "b" * 16, "parent_span_id": None, "kind": "agent", "status": "error",
             "start_time": sp["start_time"] - timedelta(minutes=5), "ttft_ms": None, "tags": ["late"]}
            for sp in spans[::7]
        ]  # fmt: skip
        for k in range(0, 60, 13):
            store.write_spans(spans[k : k + 13])
        store.write_spans(late)
        query = text(
            "SELECT * FROM metric_rollups WHERE requests <> 0 OR ttft_count <> 0 ORDER BY 1, 2, 3, 4, 5"
        )
        with store.engine.begin() as conn:
            before = [tuple(r) for r in conn.execute(query)]
            assert rebuild_rollups(conn) == 60
            after = [tuple(r) for r in conn.execute(query)]
        assert len(before) == len(after) > 0
        for b, a in zip(before, after, strict=True):
            assert b[:5] == a[:5]
            assert [pytest.approx(float(x)) for x in b[5:]] == [float(x) for x in a[5:]]

        # scores: bulk-loaded, one added and two deleted through the store, one trace's model arriving late
        tid = uuid.uuid4().hex
        agent = {**spans[0], "trace_id": tid, "kind": "agent", "requested_model": None, "model": None}
        store.write_spans([agent])
        insert_scores(
            store,
            [
                {"id": f"s{k:03d}", "project_id": sp["project_id"], "trace_id": sp["trace_id"],
                 "name": ("q", "ok", "tone")[k % 3], "data_type": ("numeric", "boolean", "categorical")[k % 3],
                 "value": None if k % 3 == 2 else float(k % 7 if k % 3 == 0 else k % 2),
                 "string_value": ("a", "b")[k % 2] if k % 3 == 2 else None, "source": "api",
                 "created_at": sp["start_time"] + timedelta(seconds=40 * k)}
                for k, sp in enumerate([*spans, agent])
            ],
        )  # fmt: skip
        assert add_score(store, trace_id=tid, name="q", data_type="numeric", value=9.5, source="api")
        assert delete_score(store, "s000") and delete_score(store, "s021")
        store.write_spans([{**spans[0], "trace_id": tid, "span_id": "d" * 16, "requested_model": "m-late"}])
        query = text("SELECT * FROM score_rollups ORDER BY 1, 2, 3, 4, 5, 6, 7, 8")
        with store.engine.begin() as conn:
            before = [tuple(r) for r in conn.execute(query)]
            assert rebuild_score_rollups(conn) == 60
            after = [tuple(r) for r in conn.execute(query)]
        assert len(before) == len(after) > 0
        for b, a in zip(before, after, strict=True):
            assert b[:8] == a[:8]
            assert [None if x is None else pytest.approx(float(x)) for x in b[8:]] == [
                None if x is None else float(x) for x in a[8:]
            ]


def test_upgrading_fills_the_rollups_and_the_tag_times(
    keel: Any, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """Migration 0007 on a database with traces, tags and scores: tag start times, metric and score
    rollups are filled in, equal to what the writer keeps."""
    from alembic import command
    from alembic.config import Config

    import keel.store.engine as engine_module

    for store in _fresh_store(keel.backend, request, tmp_path, migrate=False):
        cfg = Config()
        cfg.set_main_option("script_location", str(engine_module._MIGRATIONS))
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0006")
        at = datetime(2024, 8, 1, 9, 30)
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO traces (trace_id, project_id, name, start_time, end_time, latency_ms, status, "
                    "model, user_id, session_id, tags, input_tokens, output_tokens, cost_usd, span_count) VALUES "
                    "(:t, 'p', 'call', :at, :at, 120.0, 'ok', 'm-old', 'u1', 's1', :tags, 3, 4, 0.5, 1)"
                )
                .bindparams(t="a" * 32, at=at)
                .bindparams(bindparam("tags", ["x", "y"], type_=JSONVariant))
            )
            conn.execute(
                text("INSERT INTO trace_tags (trace_id, tag) VALUES (:t, 'x'), (:t, 'y')").bindparams(
                    t="a" * 32
                )
            )
            conn.execute(
                text(
                    "INSERT INTO spans (trace_id, span_id, project_id, name, kind, start_time, end_time, latency_ms, "
                    "ttft_ms, status, priced) VALUES (:t, 'bbbbbbbbbbbbbbbb', 'p', 'call', 'llm', :at, :at, 120.0, "
                    "42.0, 'ok', :yes)"
                ).bindparams(t="a" * 32, at=at, yes=True)
            )
            conn.execute(
                text(
                    "INSERT INTO scores (id, project_id, trace_id, name, data_type, value, source, created_at) "
                    "VALUES ('sc1', 'p', :t, 'q', 'numeric', 0.75, 'api', :at)"
                ).bindparams(t="a" * 32, at=at)
            )
        store.engine.dispose()
        engine_module.migrate(store.engine)
        with store.engine.connect() as conn:
            tag_times = conn.execute(text("SELECT start_time FROM trace_tags")).scalars().all()
        assert [t if isinstance(t, datetime) else datetime.fromisoformat(t) for t in tag_times] == [at, at]
        m = Metrics(store.engine)
        got = m.summary(start=datetime(2024, 8, 1), end=datetime(2024, 8, 2), project_id="p", group_by="user")
        assert got["totals"]["requests"] == 1 and got["totals"]["cost_usd"] == pytest.approx(0.5)
        assert [(g["group"], g["requests"]) for g in got["groups"]] == [("u1", 1)]
        assert got["totals"]["ttft_avg_ms"] == 42.0  # the span's TTFT, rolled up
        # a window inside one hour reads the traces table: the TTFT copied onto the trace summary
        edge = m.summary(start=datetime(2024, 8, 1, 9, 15), end=datetime(2024, 8, 1, 9, 45), group_by="user")
        assert [(g["group"], g["ttft_avg_ms"]) for g in edge["groups"]] == [("u1", 42.0)]
        scores = m.scores(
            start=datetime(2024, 8, 1), end=datetime(2024, 8, 2), project_id="p", group_by="model"
        )
        assert [(x["name"], x["count"], x["avg"], x["groups"]) for x in scores["scores"]] == [
            ("q", 1, 0.75, [{"group": "m-old", "count": 1, "avg": 0.75}])
        ]
        assert [t["trace_id"] for t in store.list_traces(TraceFilter(tag="y"))[0]] == ["a" * 32]


# -- users and sessions: hour and day rollups plus the traces table at the edges -------------------

M0 = datetime(2024, 6, 1, 21, 47, 30)


def _many_spans(pid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """240 traces over 50 hours (users, sessions, some missing), and late spans for every 9th trace:
    a parent 40 minutes earlier (the trace moves to another hour), a second streamed LLM call."""
    first, late = [], []
    for i in range(240):
        start = M0 + timedelta(seconds=750 * i)
        tid = uuid.uuid4().hex
        sp = {
            "trace_id": tid,
            "span_id": f"{i:016x}",
            "parent_span_id": None if i % 9 else "f" * 16,
            "project_id": pid,
            "name": "call",
            "kind": "llm",
            "start_time": start,
            "end_time": start + timedelta(milliseconds=50 + 37 * (i % 23)),
            "latency_ms": 50.0 + 37 * (i % 23),
            "ttft_ms": 10.0 + i % 13 if i % 3 == 0 else None,
            "status": "error" if i % 11 == 4 else "ok",
            "requested_model": "m",
            "input_tokens": i,
            "output_tokens": 2 * i,
            "cost_usd": 0.001 * i,
            "user": None if i % 7 == 6 else f"u{i % 6}",
            "session_id": None if i % 5 == 4 else f"s{i % 17}",
        }
        first.append(sp)
        if i % 9 == 0:
            parent = {**sp, "span_id": "f" * 16, "parent_span_id": None, "kind": "agent", "ttft_ms": None,
                      "start_time": start - timedelta(minutes=40), "latency_ms": 2_400_000.0,
                      "requested_model": None, "input_tokens": None, "output_tokens": None, "cost_usd": None}  # fmt: skip
            second = {**sp, "span_id": "e" * 16, "parent_span_id": "f" * 16, "ttft_ms": 99.0}
            late += [parent, second]
    return first, late


def _brute_force(
    store: Store, pid: str, col: str, s: datetime, e: datetime, step: int | None = None
) -> dict[tuple[str, int], dict[str, Any]]:
    """Every metric per group (and per ``step`` bucket) straight from the traces and spans tables."""
    with store.engine.connect() as conn:
        traces = conn.execute(
            text(
                f"SELECT trace_id, start_time, {col} AS g, status, input_tokens, output_tokens, cost_usd, "
                "latency_ms FROM traces WHERE project_id = :p AND start_time >= :s AND start_time < :e "
                f"AND {col} IS NOT NULL"
            ).bindparams(p=pid, s=s, e=e)
        ).all()
        ttft: dict[str, list[float]] = {}
        for tid, v in conn.execute(
            text(
                "SELECT trace_id, ttft_ms FROM spans WHERE project_id = :p AND kind = 'llm' AND ttft_ms IS NOT NULL"
            ).bindparams(p=pid)
        ):
            ttft.setdefault(tid, []).append(float(v))
    groups: dict[tuple[str, int], list[Any]] = {}
    for t in traces:
        start = t.start_time if isinstance(t.start_time, datetime) else datetime.fromisoformat(t.start_time)
        at = int((start - datetime(1970, 1, 1)).total_seconds())
        groups.setdefault((t.g, at // step * step if step else 0), []).append(t)
    out = {}
    for key, ts in groups.items():
        hist = [0.0] * len(HIST_COLUMNS)
        for t in ts:
            hist[hist_bucket(t.latency_ms)] += 1
        p50, p95, p99 = hist_quantiles(hist, (0.5, 0.95, 0.99))
        tt = [v for t in ts for v in ttft.get(t.trace_id, [])]
        n, errors = len(ts), sum(t.status == "error" for t in ts)
        out[key] = {
            "requests": n,
            "errors": errors,
            "error_rate": errors / n,
            "input_tokens": sum(t.input_tokens for t in ts),
            "output_tokens": sum(t.output_tokens for t in ts),
            "cost_usd": pytest.approx(sum(t.cost_usd or 0 for t in ts)),
            "latency_avg_ms": pytest.approx(sum(t.latency_ms for t in ts) / n, abs=1e-3),
            "latency_p50_ms": pytest.approx(p50, abs=1e-3),
            "latency_p95_ms": pytest.approx(p95, abs=1e-3),
            "latency_p99_ms": pytest.approx(p99, abs=1e-3),
            "ttft_avg_ms": pytest.approx(sum(tt) / len(tt), abs=1e-3) if tt else None,
        }
    return out


@pytest.fixture(scope="module")
def many(keel: Any) -> str:
    pid = keel.store.ensure_project("metrics-many-" + uuid.uuid4().hex[:8])
    first, late = _many_spans(pid)
    for k in range(0, len(first), 50):
        keel.store.write_spans(first[k : k + 50])
    keel.store.write_spans(late)
    return pid


WINDOWS = [
    (datetime(2024, 6, 1, 22, 10), datetime(2024, 6, 3, 23, 0)),  # edges, hours and a whole day
    (datetime(2024, 6, 2, 5, 31), datetime(2024, 6, 2, 5, 59)),  # inside one hour: traces only
    (datetime(2024, 6, 2, 5, 31), datetime(2024, 6, 2, 7, 2)),  # one whole hour and two edges
    (datetime(2024, 6, 1), datetime(2024, 6, 4)),  # whole days
]


@pytest.mark.parametrize("dim", ["user", "session"])
@pytest.mark.parametrize("window", WINDOWS, ids=["days", "in-hour", "hour+edges", "aligned"])
def test_user_and_session_summaries_equal_a_brute_force_query(
    keel: Any, many: str, dim: str, window: tuple[datetime, datetime]
) -> None:
    s, e = window
    col = "user_id" if dim == "user" else "session_id"
    want = _brute_force(keel.store, many, col, s, e)
    ranked = sorted(want, key=lambda k: (-want[k]["requests"], k[0]))
    m = Metrics(keel.store.engine)
    for limit in (100, 3):
        got = m.summary(start=s, end=e, project_id=many, group_by=dim, limit=limit)
        assert [g["group"] for g in got["groups"]] == [k[0] for k in ranked[:limit]]
        for g in got["groups"]:
            assert g == {**g, **want[(g["group"], 0)]}, g["group"]


@pytest.mark.parametrize("dim", ["user", "session"])
@pytest.mark.parametrize(("interval", "step"), [("5m", 300), ("1h", 3600), ("6h", 21600), ("1d", 86400)])
def test_user_and_session_timeseries_equal_a_brute_force_query(
    keel: Any, many: str, dim: str, interval: str, step: int
) -> None:
    s, e = WINDOWS[0]
    col = "user_id" if dim == "user" else "session_id"
    got = Metrics(keel.store.engine).timeseries(
        start=s, end=e, interval=interval, project_id=many, group_by=dim, limit=20
    )
    want = _brute_force(keel.store, many, col, got["start"], got["end"], step)
    totals: dict[str, int] = {}
    for (g, _t), v in want.items():
        totals[g] = totals.get(g, 0) + v["requests"]
    assert [x["group"] for x in got["series"]] == sorted(totals, key=lambda g: (-totals[g], g))
    for series in got["series"]:
        for pt in series["points"]:
            at = int((pt["t"] - datetime(1970, 1, 1)).total_seconds())
            exp = want.get((series["group"], at))
            if exp is None:
                assert pt["requests"] == 0 and pt["ttft_avg_ms"] is None, (series["group"], pt["t"])
            else:
                assert pt == {**pt, **exp}, (series["group"], pt["t"])


# -- scores --------------------------------------------------------------------------------------


def test_scores(keel: Any, data: Dataset) -> None:
    at = T0 + timedelta(minutes=5)
    items = []
    for k, row in enumerate(data.rows[:10]):
        items.append(("helpful", "numeric", float(k), None, row))
        items.append(("thumbs", "boolean", float(k % 2), None, row))
        items.append(("tone", "categorical", None, "polite" if k < 7 else "rude", row))
    insert_scores(
        keel.store,
        [
            {
                "id": uuid.uuid4().hex,
                "project_id": data.project_id,
                "trace_id": row.trace_id,
                "name": name,
                "data_type": dtype,
                "value": value,
                "string_value": label,
                "source": "api",
                "created_at": at + timedelta(minutes=k % 30),
            }
            for k, (name, dtype, value, label, row) in enumerate(items)
        ],
    )
    r = keel.http.get(
        "/api/metrics/scores", params=window(project=data.project, interval="1h", group_by="model")
    )
    assert r.status_code == 200, r.text
    scores = {s["name"]: s for s in r.json()["scores"]}
    assert set(scores) == {"helpful", "thumbs", "tone"}
    helpful = scores["helpful"]
    assert helpful["count"] == 10 and helpful["avg"] == pytest.approx(4.5)
    assert helpful["min"] == 0 and helpful["max"] == 9 and helpful["data_type"] == "numeric"
    assert [p["count"] for p in helpful["points"]] == [0, 10, 0]
    by_model = {g["group"]: g for g in helpful["groups"]}
    assert by_model["m-a"]["avg"] == pytest.approx(sum(range(0, 10, 2)) / 5)  # even rows are m-a
    assert scores["thumbs"]["avg"] == pytest.approx(0.5)
    assert scores["tone"]["labels"] == {"polite": 7, "rude": 3} and scores["tone"]["avg"] is None
    only = keel.http.get("/api/metrics/scores", params=window(project=data.project, name="tone")).json()
    assert [s["name"] for s in only["scores"]] == ["tone"]


def _score_brute_force(
    store: Store, pid: str, s: datetime, e: datetime, step: int, group_by: str | None
) -> dict[str, dict[str, Any]]:
    """/api/metrics/scores' numbers straight from the scores table (joined to traces for groups)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT s.name, s.data_type, s.value, s.string_value, s.created_at, t.model, t.prompt_name, "
                "t.prompt_version FROM scores s JOIN traces t ON t.trace_id = s.trace_id "
                "WHERE s.project_id = :p AND s.created_at >= :s AND s.created_at < :e"
            ).bindparams(p=pid, s=s, e=e)
        ).all()
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        item = out.setdefault(r.name, {"rows": [], "data_type": r.data_type})
        item["rows"].append(r)
    for item in out.values():
        rs = item.pop("rows")
        values = [r.value for r in rs if r.value is not None]
        points: dict[int, list[float]] = {}
        groups: dict[str | None, list[Any]] = {}
        for r in rs:
            at = r.created_at if isinstance(r.created_at, datetime) else datetime.fromisoformat(r.created_at)
            t = int((at - datetime(1970, 1, 1)).total_seconds()) // step * step
            points.setdefault(t, []).append(r.value)
            if group_by == "model":
                groups.setdefault(r.model, []).append(r.value)
            elif group_by == "prompt_version":
                g = f"{r.prompt_name}@{r.prompt_version}" if r.prompt_name else None
                groups.setdefault(g, []).append(r.value)
        item.update(
            count=len(rs),
            avg=pytest.approx(sum(values) / len(values)) if values else None,
            min=min(values) if values else None,
            max=max(values) if values else None,
            labels={
                lb: sum(r.string_value == lb for r in rs)
                for lb in {r.string_value for r in rs if r.string_value}
            },
            points={t: (len(v), _mean(v)) for t, v in points.items()},
            groups=sorted(
                ((g, len(v), _mean(v)) for g, v in groups.items()), key=lambda x: (-x[1], x[0] or "")
            ),
        )
    return out


def _mean(values: list[Any]) -> Any:
    vs = [v for v in values if v is not None]
    return pytest.approx(sum(vs) / len(vs)) if vs else None


def _assert_scores_match(
    store: Store, pid: str, s: datetime, e: datetime, interval: str, group_by: str | None
) -> None:
    got = Metrics(store.engine).scores(start=s, end=e, interval=interval, project_id=pid, group_by=group_by)
    step = {"1m": 60, "5m": 300, "1h": 3600}[interval]
    want = _score_brute_force(store, pid, got["start"], got["end"], step, group_by)
    assert [x["name"] for x in got["scores"]] == sorted(want)
    for item in got["scores"]:
        exp = want[item["name"]]
        for k in ("data_type", "count", "avg", "min", "max", "labels"):
            assert item[k] == exp[k], (item["name"], k)
        pts = {int((p["t"] - datetime(1970, 1, 1)).total_seconds()): p for p in item["points"]}
        for t, p in pts.items():
            assert (p["count"], p["avg"]) == exp["points"].get(t, (0, None)), (item["name"], t)
        if group_by is not None:
            assert [(g["group"], g["count"], g["avg"]) for g in item["groups"]] == exp["groups"], item["name"]


def test_score_rollups_follow_writes_deletes_and_late_spans(keel: Any) -> None:
    """Scores posted and deleted through the API, and a scored trace whose model and prompt arrive
    later: the rollup-backed numbers equal a query over the scores table throughout."""
    project = "metrics-scores-" + uuid.uuid4().hex[:8]
    pid = keel.store.ensure_project(project)
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = make_rows(6, now - timedelta(minutes=30))
    keel.store.write_spans([span_of(r, pid) for r in rows])
    # a trace that starts as an agent span only: no model, no prompt yet
    late_tid = uuid.uuid4().hex
    root = {**span_of(rows[0], pid), "trace_id": late_tid, "span_id": "r" * 16, "kind": "agent",
            "requested_model": None, "model": None, "prompt_name": None, "prompt_version": None}  # fmt: skip
    keel.store.write_spans([root])

    def post(tid: str, name: str, value: Any) -> str:
        r = keel.http.post("/api/scores", json={"trace_id": tid, "name": name, "value": value})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    ids = [post(r.trace_id, "helpful", float(r.i)) for r in rows]
    ids += [post(r.trace_id, "thumbs", r.i % 2 == 0) for r in rows]
    post(late_tid, "helpful", 2.5)
    post(late_tid, "tone", "rude")
    for r in rows[:4]:
        post(r.trace_id, "tone", "polite" if r.i < 3 else "rude")
    s, e = now - timedelta(hours=1), now + timedelta(minutes=2)
    for group_by in (None, "model", "prompt_version"):
        _assert_scores_match(keel.store, pid, s, e, "1m", group_by)

    # the deleted score held the max: max is read again; a name whose scores are all gone is not listed
    assert keel.http.delete(f"/api/scores/{ids[5]}").status_code == 200
    for sid in ids[6:]:
        assert keel.http.delete(f"/api/scores/{sid}").status_code == 200
    # the late trace's LLM span arrives: its scores move to its model and prompt version
    child = {**span_of(rows[1], pid), "trace_id": late_tid, "span_id": "c" * 16, "parent_span_id": "r" * 16,
             "requested_model": "m-late", "prompt_name": "late", "prompt_version": 7}  # fmt: skip
    keel.store.write_spans([child])
    got = Metrics(keel.store.engine).scores(start=s, end=e, project_id=pid, group_by="model")
    helpful = next(x for x in got["scores"] if x["name"] == "helpful")
    assert helpful["max"] == 4.0 and "thumbs" not in [x["name"] for x in got["scores"]]
    assert ("m-late", 1) in [(g["group"], g["count"]) for g in helpful["groups"]]
    for interval in ("1m", "5m", "1h"):
        for group_by in (None, "model", "prompt_version"):
            _assert_scores_match(keel.store, pid, s, e, interval, group_by)


# -- pruning minute rows ---------------------------------------------------------------------------


def test_pruned_minute_rows_fall_back_to_hour_rows(
    keel: Any, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    for store in _fresh_store(keel.backend, request, tmp_path):
        pid = store.ensure_project("prune")
        first, late = _many_spans(pid)
        store.write_spans(first)
        store.write_spans(late)
        insert_scores(
            store,
            [
                {"id": uuid.uuid4().hex, "project_id": pid, "trace_id": sp["trace_id"], "name": "q",
                 "data_type": "numeric", "value": float(k % 5), "string_value": None, "source": "api",
                 "created_at": sp["start_time"] + timedelta(minutes=3)}
                for k, sp in enumerate(first[::4])
            ],
        )  # fmt: skip
        m = Metrics(store.engine)
        s, e = datetime(2024, 6, 2, 5, 31), datetime(2024, 6, 2, 9, 12)
        exact = m.summary(start=s, end=e, project_id=pid)
        assert exact["start"] == s and exact["totals"]["requests"] == sum(
            v["requests"] for v in _brute_force(store, pid, "'x'", s, e).values()
        )
        hours = m.summary(start=datetime(2024, 6, 2, 5), end=datetime(2024, 6, 2, 10), project_id=pid)

        cut = datetime(2024, 6, 2, 8, 40)  # minute rows before 08:00 go
        assert prune_minute_rows(store.engine, cut) > 0
        with store.engine.connect() as conn:
            for table in ("metric_rollups", "score_rollups"):
                left = conn.execute(text(f"SELECT MIN(bucket) FROM {table} WHERE grain = 60")).scalar()
                assert left >= int((datetime(2024, 6, 2, 8) - datetime(1970, 1, 1)).total_seconds()), table
                assert conn.execute(text(f"SELECT COUNT(*) FROM {table} WHERE grain = 3600")).scalar()
        # the start's hour has no minute rows left: the whole hour; the end's hour still has them
        widened = m.summary(start=s, end=e, project_id=pid, group_by="user", limit=100)
        assert widened["start"] == datetime(2024, 6, 2, 5) and widened["end"] == e
        brute = _brute_force(store, pid, "user_id", datetime(2024, 6, 2, 5), e)
        assert {g["group"]: g["requests"] for g in widened["groups"]} == {
            k[0]: v["requests"] for k, v in brute.items()
        }
        # whole hours read as before
        again = m.summary(start=datetime(2024, 6, 2, 5), end=datetime(2024, 6, 2, 10), project_id=pid)
        assert again["totals"] == hours["totals"]
        _assert_scores_match(store, pid, datetime(2024, 6, 1), datetime(2024, 6, 4), "1h", "model")


def test_the_retention_sweep_prunes_minute_rows(
    keel: Any, mock_upstream: Any, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """keel serve's background sweep keeps ``rollup_minute_days`` of minute rows (SQLite: a database
    of its own, so pruning cannot touch the other tests' rows on the shared PostgreSQL database)."""
    if keel.backend != "sqlite":
        return
    store = Store.from_url(f"sqlite:///{tmp_path}/keel.db")
    old = make_rows(5, datetime.now(UTC).replace(tzinfo=None) - timedelta(days=3))
    new = make_rows(5, datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=2))
    store.write_spans([span_of(r, "p") for r in old + new])
    store.close()
    server, app = make_keel("sqlite", tmp_path, mock_upstream, request, rollup_minute_days=1.0)
    try:
        deadline = time.monotonic() + 20
        query = text("SELECT COUNT(*) FROM metric_rollups WHERE grain = 60 AND dim = 'all'")
        while True:
            with app.state.store.engine.connect() as conn:
                minutes = conn.execute(query).scalar()
            if minutes == 5:  # the recent traces' minute rows only
                break
            assert time.monotonic() < deadline, minutes
            time.sleep(0.1)
    finally:
        server.stop()


# -- the trace explorer's tag filter ---------------------------------------------------------------


def test_tag_filter_pages_newest_first_and_follows_moved_traces(keel: Any) -> None:
    pid = keel.store.ensure_project("metrics-tags-" + uuid.uuid4().hex[:8])
    tag = "t-" + uuid.uuid4().hex[:8]
    rows = make_rows(30, datetime(2024, 7, 1, 12))
    spans = [span_of(r, pid) for r in rows]
    for sp in spans:
        sp["tags"] = [tag] if sp is spans[0] or int(sp["trace_id"], 16) % 3 else ["other"]
    keel.store.write_spans(spans)
    # trace 0 gets a parent that starts an hour earlier: it becomes the oldest of the tag
    keel.store.write_spans([{**spans[0], "span_id": "p" * 16, "parent_span_id": None, "kind": "agent",
                             "start_time": rows[0].start - timedelta(hours=1), "tags": [tag, "more"]}])  # fmt: skip
    tagged = [r for r, sp in zip(rows, spans, strict=True) if tag in sp["tags"]]
    want = sorted(
        ((r.start - timedelta(hours=1) if r.i == 0 else r.start, r.trace_id) for r in tagged), reverse=True
    )
    got: list[str] = []
    cursor = None
    while True:
        page, cursor = keel.store.list_traces(TraceFilter(project_id=pid, tag=tag), limit=4, cursor=cursor)
        got += [t["trace_id"] for t in page]
        if cursor is None:
            break
    assert got == [tid for _, tid in want]
    window = keel.store.list_traces(
        TraceFilter(tag=tag, start=datetime(2024, 7, 1, 12, 10), end=datetime(2024, 7, 1, 12, 30)), limit=50
    )[0]
    assert [t["trace_id"] for t in window] == [
        tid for at, tid in want if datetime(2024, 7, 1, 12, 10) <= at < datetime(2024, 7, 1, 12, 30)
    ]
    more = keel.store.list_traces(TraceFilter(tag="more"), limit=50)[0]
    assert [t["trace_id"] for t in more] == [rows[0].trace_id]
    with keel.store.engine.connect() as conn:
        stored = conn.execute(
            text("SELECT DISTINCT start_time FROM trace_tags WHERE trace_id = :t").bindparams(
                t=rows[0].trace_id
            )
        ).all()
    assert len(stored) == 1


def test_tag_filter_is_a_walk_of_the_tag_index(keel: Any) -> None:
    captured: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if "trace_tags" in statement and "LIMIT" in statement:
            captured.append((statement, params))

    for f in (TraceFilter(tag="x"), TraceFilter(tag="x", model="m-a"), TraceFilter(tag="x", project_id="p")):
        event.listen(keel.store.engine, "before_cursor_execute", grab)
        try:
            keel.store.list_traces(f, limit=50, cursor=_encode_cursor(datetime(2024, 7, 1), "f" * 32))
        finally:
            event.remove(keel.store.engine, "before_cursor_execute", grab)
        statement, params = captured[-1]
        with keel.store.engine.connect() as conn:
            if keel.backend == "sqlite":
                plan = "\n".join(
                    str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                )
                assert "ix_trace_tags_tag_start (tag=? AND start_time<?)" in plan, plan  # seeks to the cursor
                assert "TEMP B-TREE" not in plan, plan  # newest first straight off the index: no sort
            else:
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
                conn.rollback()
                assert "ix_trace_tags_tag_start" in plan, plan


# -- scope and errors ------------------------------------------------------------------------------


def test_a_virtual_key_sees_only_its_project(keel: Any, data: Dataset) -> None:
    other = keel.store.ensure_project("metrics-other-" + uuid.uuid4().hex[:8])
    keel.store.write_spans([span_of(r, other) for r in make_rows(5)])
    key = keel.create_key(project=data.project)["key"]
    with httpx.Client(base_url=keel.url, headers={"authorization": f"Bearer {key}"}, timeout=30) as c:
        mine = c.get("/api/metrics/summary", params=window()).json()["totals"]
        assert mine["requests"] == len(data.rows)
        # naming another project does not widen the scope
        assert c.get("/api/metrics/summary", params=window(project=other)).json()["totals"]["requests"] == 40
        ts = c.get("/api/metrics/timeseries", params=window(interval="1h")).json()
        assert sum(p["value"] for p in ts["series"][0]["points"]) == 40
    everyone = keel.http.get("/api/metrics/summary", params=window()).json()["totals"]
    assert everyone["requests"] >= 45


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/api/metrics/timeseries", {"metric": "bogus"}, 400, "invalid_request"),
        ("/api/metrics/timeseries", {"interval": "7m"}, 400, "invalid_request"),
        ("/api/metrics/summary", {"group_by": "planet"}, 400, "invalid_request"),
        ("/api/metrics/summary", {"start": "yesterday"}, 400, "invalid_time"),
        (
            "/api/metrics/summary",
            {"start": "2024-03-10T12:00:00Z", "end": "2024-03-10T11:00:00Z"},
            400,
            "invalid_time",
        ),
        (
            "/api/metrics/timeseries",
            {"interval": "1m", "start": "2023-01-01T00:00:00Z"},
            400,
            "invalid_parameter",
        ),
        ("/api/metrics/scores", {"group_by": "user"}, 400, "invalid_request"),
        ("/api/metrics/summary", {"limit": "0"}, 400, "invalid_request"),
        ("/api/metrics/summary", {"project": "no-such-project"}, 404, "not_found"),
    ],
)
def test_bad_input_is_a_clear_error(
    keel: Any, path: str, params: dict[str, str], status: int, code: str
) -> None:
    r = keel.http.get(path, params=params)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_metrics_need_a_key_and_are_documented(keel: Any) -> None:
    assert httpx.get(keel.url + "/api/metrics/summary", timeout=30).status_code == 401
    spec = keel.http.get("/openapi.json").json()
    for path in ("/api/metrics/summary", "/api/metrics/timeseries", "/api/metrics/scores"):
        assert path in spec["paths"], path
    summary = spec["paths"]["/api/metrics/summary"]["get"]
    assert "histogram" in summary["description"]
    names = {p["name"] for p in summary["parameters"]}
    assert {"start", "end", "project", "group_by", "limit"} <= names
    ts_params = {p["name"] for p in spec["paths"]["/api/metrics/timeseries"]["get"]["parameters"]}
    assert {"metric", "interval", "group_by"} <= ts_params


# -- end to end through the gateway ------------------------------------------------------------------


def test_gateway_traffic_shows_up(keel: Any) -> None:
    project = "metrics-gw-" + uuid.uuid4().hex[:8]
    key = keel.create_key(project=project)["key"]
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key=key, max_retries=0, timeout=30)
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello"}],
        user="dash-user",
        extra_headers={"x-keel-tags": "dash"},
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
        user="dash-user",
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="fault-500", messages=[{"role": "user", "content": "x"}])

    auth = {"authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 20
    while True:
        body = keel.http.get("/api/metrics/summary", params={"group_by": "model"}, headers=auth).json()
        if body["totals"]["requests"] >= 3:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    totals = body["totals"]
    assert totals["requests"] == 3 and totals["errors"] == 1
    assert totals["input_tokens"] > 0 and totals["cost_usd"] > 0
    assert totals["ttft_avg_ms"] is not None and totals["ttft_avg_ms"] > 0  # the streamed call
    assert {g["group"]: g["requests"] for g in body["groups"]} == {"gpt-4o-mini": 2, "fault-500": 1}
    traces = keel.http.get("/api/traces", headers=auth, params={"limit": 10}).json()["data"]
    assert totals["input_tokens"] == sum(t["input_tokens"] for t in traces)
    assert totals["cost_usd"] == pytest.approx(sum(t["cost_usd"] or 0 for t in traces))
    users = keel.http.get("/api/metrics/summary", params={"group_by": "user"}, headers=auth).json()["groups"]
    assert [(g["group"], g["requests"]) for g in users] == [("dash-user", 2)]
