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
from datetime import datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from keel.store import Store
from keel.store.metrics import _cover, hist_quantile
from keel.store.models import Score
from keel.store.rollups import HIST_COLUMNS, hist_bounds, hist_bucket, rebuild_rollups

T0 = datetime(2024, 3, 10, 10, 0)
SQRT2 = math.sqrt(2.0)


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
        if group_by in ("user", "session"):
            exp["ttft_avg_ms"] = None  # not kept per user or session
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


def _fresh_store(backend: str, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    if backend == "sqlite":
        store = Store.from_url(f"sqlite:///{tmp_path}/rebuild.db")
        yield store
        store.close()
        return
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    name = "keel_rollups_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        store = Store.from_url(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
        yield store
        store.close()
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_rebuild_reproduces_the_incremental_rollups(
    keel: Any, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """Rollups kept batch by batch (with late spans) equal a recomputation from the traces table."""
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


# -- scores --------------------------------------------------------------------------------------


def test_scores(keel: Any, data: Dataset) -> None:
    at = T0 + timedelta(minutes=5)
    items = []
    for k, row in enumerate(data.rows[:10]):
        items.append(("helpful", "numeric", float(k), None, row))
        items.append(("thumbs", "boolean", float(k % 2), None, row))
        items.append(("tone", "categorical", None, "polite" if k < 7 else "rude", row))
    with Session(keel.store.engine) as s, s.begin():
        for k, (name, dtype, value, label, row) in enumerate(items):
            s.add(
                Score(
                    id=uuid.uuid4().hex,
                    project_id=data.project_id,
                    trace_id=row.trace_id,
                    name=name,
                    data_type=dtype,
                    value=value,
                    string_value=label,
                    source="api",
                    created_at=at + timedelta(minutes=k % 30),
                )
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
