"""Per-project retention: PATCH /api/projects/{project}, GET /api/retention, the batched sweep, and the
background task of a running keel deleting old traces with their spans, tags and scores.

The PostgreSQL leg shares one database with the other test modules, so every trace deleted here is
either in a project of this module or dated decades ago (no other test writes such traces).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from keel.store import Store
from keel.store.models import Score, Span, TraceTag
from keel.store.scores import add_score, delete_project_traces_before, set_project_retention, sweep_retention
from keel.tracing import span_to_row
from keel.types import SpanRecord
from tests.conftest import BACKENDS, Keel, make_keel

DAY = 86400.0
LONG_AGO = datetime(1995, 1, 1)  # the sweep's "now" in store-level tests
LONG_AGO_EPOCH = (LONG_AGO - datetime(1970, 1, 1)).total_seconds()


def write_trace(store: Store, project_id: str | None, start: float, *, spans: int = 2) -> str:
    tid = uuid.uuid4().hex
    root = SpanRecord(
        trace_id=tid,
        span_id=uuid.uuid4().hex[:16],
        name="agent",
        kind="chain",
        start_time=start,
        end_time=start + 1,
        project_id=project_id,
        tags=["retention-test"],
    )
    rows = [span_to_row(root)]
    for _ in range(spans - 1):
        child = SpanRecord(
            trace_id=tid,
            span_id=uuid.uuid4().hex[:16],
            name="llm",
            kind="llm",
            start_time=start,
            end_time=start + 0.5,
            parent_span_id=root.span_id,
            project_id=project_id,
        )
        rows.append(span_to_row(child))
    store.write_spans(rows)
    add_score(store, trace_id=tid, name="q", data_type="numeric", value=1.0, source="api")
    return tid


def leftovers(store: Store, tids: list[str]) -> dict[str, int]:
    """Rows of any kind still stored for these traces."""
    with Session(store.engine) as s:
        return {
            "traces": sum(store.get_trace(t) is not None for t in tids),
            "spans": s.scalar(select(func.count()).select_from(Span).where(Span.trace_id.in_(tids))) or 0,
            "tags": s.scalar(select(func.count()).select_from(TraceTag).where(TraceTag.trace_id.in_(tids)))
            or 0,
            "scores": s.scalar(select(func.count()).select_from(Score).where(Score.trace_id.in_(tids))) or 0,
        }


GONE = {"traces": 0, "spans": 0, "tags": 0, "scores": 0}


# -- the sweep, on the store ---------------------------------------------------------------------------


def test_sweep_applies_project_retention_over_the_global_one(keel: Keel) -> None:
    store = keel.store
    run = uuid.uuid4().hex[:8]
    short = store.ensure_project(f"ret-short-{run}")  # 1 day
    forever = store.ensure_project(f"ret-forever-{run}")  # 0: kept forever
    default = store.ensure_project(f"ret-default-{run}")  # follows the global 5 days
    set_project_retention(store, short, 1)
    set_project_retention(store, forever, 0)
    ages = (0.5, 2, 10)
    made: dict[tuple[str | None, float], str] = {}
    for pid in (short, forever, default, None):
        for age in ages:
            made[(pid, age)] = write_trace(store, pid, LONG_AGO_EPOCH - age * DAY)

    deleted = sweep_retention(store, 5, now=LONG_AGO)
    assert deleted[short] == 2
    assert forever not in deleted
    assert deleted[None] >= 2  # this module's default-project and project-less traces of 10 days

    kept = {k for k, tid in made.items() if store.get_trace(tid) is not None}
    assert kept == {
        (short, 0.5),
        (forever, 0.5),
        (forever, 2),
        (forever, 10),
        (default, 0.5),
        (default, 2),
        (None, 0.5),
        (None, 2),
    }
    gone = [tid for k, tid in made.items() if k not in kept]
    assert leftovers(store, gone) == GONE
    assert leftovers(store, [made[(forever, 10)]]) == {"traces": 1, "spans": 2, "tags": 1, "scores": 1}

    # a global setting of 0 keeps everything but what projects expire themselves
    older = write_trace(store, default, LONG_AGO_EPOCH - 400 * DAY)
    mine = write_trace(store, short, LONG_AGO_EPOCH - 400 * DAY)
    assert sweep_retention(store, 0, now=LONG_AGO) == {short: 1}
    assert store.get_trace(older) is not None and store.get_trace(mine) is None


def test_deletes_go_in_batches(keel: Keel) -> None:
    store = keel.store
    pid = store.ensure_project(f"ret-batch-{uuid.uuid4().hex[:8]}")
    old = [write_trace(store, pid, LONG_AGO_EPOCH - 3 * DAY) for _ in range(23)]
    new = write_trace(store, pid, LONG_AGO_EPOCH)
    n = delete_project_traces_before(store, LONG_AGO - timedelta(days=1), project_id=pid, batch=5)
    assert n == 23
    assert leftovers(store, old) == GONE and store.get_trace(new) is not None


# -- the API --------------------------------------------------------------------------------------------


def test_patch_project_retention(keel: Keel) -> None:
    name = f"ret-api-{uuid.uuid4().hex[:8]}"
    pid = keel.store.ensure_project(name)
    r = keel.http.patch(f"/api/projects/{name}", json={"retention_days": 30})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": pid, "name": name, "retention_days": 30.0, "effective_retention_days": 30.0}
    r = keel.http.patch(f"/api/projects/{pid}", json={"retention_days": 0})
    assert r.json()["retention_days"] == 0 and r.json()["effective_retention_days"] == 0
    r = keel.http.patch(f"/api/projects/{pid}", json={"retention_days": None})
    assert r.json()["retention_days"] is None
    assert r.json()["effective_retention_days"] == keel.app.state.settings.retention_days

    keel.http.patch(f"/api/projects/{pid}", json={"retention_days": 7.5})
    body = keel.http.get("/api/retention").json()
    assert body["default_retention_days"] == 0 and body["interval_s"] > 0
    row = next(p for p in body["projects"] if p["id"] == pid)
    assert row["retention_days"] == 7.5 and row["effective_retention_days"] == 7.5

    key = keel.create_key(project=name)["key"]
    auth = {"authorization": f"Bearer {key}"}
    mine = keel.http.get("/api/retention", headers=auth).json()["projects"]
    assert [p["id"] for p in mine] == [pid]
    r = keel.http.patch(f"/api/projects/{pid}", json={"retention_days": 1}, headers=auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"retention_days": -1}, 400),
        ({"retention_days": "a week"}, 400),
        ({}, 400),
        ({"retention_days": 3, "name": "renamed"}, 400),
        ({"retention_days": 1e9}, 400),
    ],
)
def test_bad_retention_patches(keel: Keel, body: dict[str, Any], status: int) -> None:
    name = f"ret-bad-{uuid.uuid4().hex[:8]}"
    keel.store.ensure_project(name)
    r = keel.http.patch(f"/api/projects/{name}", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_patch_unknown_project_is_404(keel: Keel) -> None:
    r = keel.http.patch("/api/projects/no-such-project-xyz", json={"retention_days": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# -- the background task of a running keel --------------------------------------------------------------


# function-scoped: its sweeps (real "now") must not run while the store-level tests above hold traces
@pytest.fixture(params=BACKENDS)
def sweeping_keel(
    request: pytest.FixtureRequest, mock_upstream: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    """A keel sweeping every 0.2 s, with a global retention of 20,000 days (only decades-old traces)."""
    backend = request.param
    server, app = make_keel(
        backend,
        tmp_path_factory.mktemp(f"sweep-{backend}"),
        mock_upstream,
        request,
        retention_days=20_000.0,
        retention_interval_s=0.2,
    )
    k = Keel(server, app, backend)
    try:
        yield k
    finally:
        k.http.close()
        server.stop()


def wait_until(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def test_the_background_task_sweeps_per_project(sweeping_keel: Keel) -> None:
    k = sweeping_keel
    store = k.store
    run = uuid.uuid4().hex[:8]
    now = time.time()
    week = k.http.post("/api/projects", json={"name": f"sweep-week-{run}"}).json()["id"]
    keep = k.http.post("/api/projects", json={"name": f"sweep-keep-{run}"}).json()["id"]
    glob = k.http.post("/api/projects", json={"name": f"sweep-global-{run}"}).json()["id"]
    # settings first: the sweeper runs all along
    assert k.http.patch(f"/api/projects/{week}", json={"retention_days": 7}).status_code == 200
    assert k.http.patch(f"/api/projects/{keep}", json={"retention_days": 0}).status_code == 200
    decades = now - 20_500 * DAY  # 1969: older than the global 20,000 days
    traces = {
        "week-old": write_trace(store, week, now - 10 * DAY),
        "week-new": write_trace(store, week, now - 1 * DAY),
        "keep-ancient": write_trace(store, keep, decades),
        "global-ancient": write_trace(store, glob, decades),
        "global-old": write_trace(store, glob, now - 10 * DAY),
    }

    wait_until(lambda: store.get_trace(traces["week-old"]) is None, "the week project's old trace deleted")
    wait_until(lambda: store.get_trace(traces["global-ancient"]) is None, "the decades-old trace deleted")
    assert leftovers(store, [traces["week-old"], traces["global-ancient"]]) == GONE
    for name in ("week-new", "keep-ancient", "global-old"):
        assert store.get_trace(traces[name]) is not None, name
    r = k.http.get(f"/api/traces/{traces['week-old']}")
    assert r.status_code == 404
