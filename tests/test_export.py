"""Trace export: GET /api/traces/export (JSONL, CSV; streamed in batches) and `keel traces export`.

Over 1,200 traces are written through the store's trace-writer path into one project, so an export
spans several batches; every export is checked against the trace list API with the same filters.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from keel.server.app import database_url
from keel.store import TraceFilter
from keel.store.export import CSV_COLUMNS, EXPORT_BATCH, iter_trace_batches
from keel.tracing import span_to_row
from keel.types import SpanRecord, Usage
from tests.conftest import Keel

N_TRACES = 2 * EXPORT_BATCH + 203
MODELS = ("gpt-4o-mini", "claude-haiku", "cheap")


@dataclass
class Seeded:
    project: str
    project_id: str
    t0: float
    formula_trace: str
    scored: list[str]


def _rec(tid: str, i: int, pid: str, t0: float, **kw: Any) -> SpanRecord:
    start = t0 + i * 2.0
    base: dict[str, Any] = {
        "trace_id": tid,
        "span_id": uuid.uuid4().hex[:16],
        "name": "chat gpt",
        "kind": "llm",
        "start_time": start,
        "end_time": start + 0.5,
        "project_id": pid,
        "model": MODELS[i % 3],
        "requested_model": MODELS[i % 3],
        "provider": "openai",
        "usage": Usage(input_tokens=10 + i, output_tokens=i % 17),
        "user": f"user-{i % 5}",
        "session_id": f"sess-{i % 11}",
        "tags": [f"t{i % 3}"],
        "status": "error" if i % 7 == 0 else "ok",
        "error": "upstream_error: boom" if i % 7 == 0 else None,
        "prompt_name": "support" if i % 4 == 0 else None,
        "prompt_version": (i % 8) // 4 + 1 if i % 4 == 0 else None,
        "input": {"messages": [{"role": "user", "content": f"question {i}"}]},
        "output": {"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}}]},
    }
    base.update(kw)
    return SpanRecord(**base)


@pytest.fixture(scope="module")
def seeded(keel: Keel) -> Seeded:
    run = uuid.uuid4().hex[:8]
    project = f"export-{run}"
    pid = keel.store.ensure_project(project)
    t0 = time.time() - 3 * 86400
    rows: list[dict[str, Any]] = []
    formula = ""
    tids: list[str] = []
    for i in range(N_TRACES):
        tid = uuid.uuid4().hex
        tids.append(tid)
        if i == 5:
            formula = tid
            root = _rec(tid, i, pid, t0, name="=HYPERLINK(1)", kind="chain", parent_span_id=None)
            rows.append(span_to_row(root))
            rows.append(span_to_row(_rec(tid, i, pid, t0, parent_span_id=root.span_id)))
        else:
            rows.append(span_to_row(_rec(tid, i, pid, t0)))
    for k in range(0, len(rows), 400):
        keel.store.write_spans(rows[k : k + 400])
    scored = tids[:3]
    for tid in scored:
        r = keel.http.post("/api/scores", json={"trace_id": tid, "name": "quality", "value": 0.9})
        assert r.status_code == 201, r.text
    return Seeded(project, pid, t0, formula, scored)


def listed(keel: Keel, **params: Any) -> list[dict[str, Any]]:
    """Every trace the list API returns for these filters, following the cursor."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = {**params, "limit": 500, **({"cursor": cursor} if cursor else {})}
        r = keel.http.get("/api/traces", params=q)
        assert r.status_code == 200, r.text
        out += r.json()["data"]
        cursor = r.json()["next_cursor"]
        if not cursor:
            return out


def export(keel: Keel, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return keel.http.get("/api/traces/export", params=params, headers=headers or {})


def jsonl(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    assert r.text.endswith("\n") or r.text == ""
    return [orjson.loads(line) for line in r.text.splitlines()]


def test_jsonl_export_is_the_trace_list_streamed(keel: Keel, seeded: Seeded) -> None:
    r = export(keel, project=seeded.project)  # by name; the list API takes the id
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert r.headers["content-disposition"].startswith('attachment; filename="traces-')
    assert "content-length" not in r.headers  # streamed, not buffered
    rows = jsonl(r)
    want = listed(keel, project=seeded.project_id)
    assert len(rows) == len(want) == N_TRACES
    assert [x["trace_id"] for x in rows] == [x["trace_id"] for x in want]
    for got, exp in zip(rows, want, strict=True):
        assert {k: got[k] for k in exp} == exp
    assert "spans" not in rows[0] and "scores" not in rows[0]


@pytest.mark.parametrize(
    "filters",
    [
        {"model": "claude-haiku"},
        {"status": "error"},
        {"user": "user-3"},
        {"session": "sess-4"},
        {"tag": "t2"},
        {"model": "cheap", "status": "ok", "user": "user-1"},
        {"prompt": "support", "prompt_version": "2"},
        {"start": "OFFSET:599", "end": "OFFSET:1199"},
    ],
)
def test_export_filters_match_the_list(keel: Keel, seeded: Seeded, filters: dict[str, str]) -> None:
    from datetime import UTC, datetime

    params = {
        k: (
            datetime.fromtimestamp(seeded.t0 + int(v.split(":")[1]), UTC).isoformat()
            if v.startswith("OFFSET:")
            else v
        )
        for k, v in filters.items()
    }
    want = [x["trace_id"] for x in listed(keel, project=seeded.project_id, **params)]
    got = [x["trace_id"] for x in jsonl(export(keel, project=seeded.project_id, **params))]
    assert got == want and 0 < len(got) < N_TRACES
    if "start" in filters:
        assert len(got) == 300  # one trace every 2 s
    csv_ids = [
        row["trace_id"]
        for row in csv.DictReader(
            io.StringIO(export(keel, format="csv", project=seeded.project_id, **params).text)
        )
    ]
    assert csv_ids == want


def test_limit_caps_the_export(keel: Keel, seeded: Seeded) -> None:
    rows = jsonl(export(keel, project=seeded.project_id, limit=742))
    want = listed(keel, project=seeded.project_id)[:742]
    assert [x["trace_id"] for x in rows] == [x["trace_id"] for x in want]


def test_include_spans_and_scores(keel: Keel, seeded: Seeded) -> None:
    rows = jsonl(export(keel, project=seeded.project_id, include="spans,scores"))
    assert len(rows) == N_TRACES
    by_id = {x["trace_id"]: x for x in rows}
    for tid in [seeded.formula_trace, *seeded.scored, rows[0]["trace_id"], rows[-1]["trace_id"]]:
        detail = keel.http.get(f"/api/traces/{tid}").json()
        got = by_id[tid]["spans"]
        assert [{k: g[k] for k in s} for g, s in zip(got, detail["spans"], strict=True)] == detail["spans"]
        assert by_id[tid]["scores"] == detail["scores"]
    assert len(by_id[seeded.formula_trace]["spans"]) == 2
    assert by_id[seeded.formula_trace]["spans"][1]["input"]["messages"][0]["content"] == "question 5"
    assert [s["value"] for s in by_id[seeded.scored[0]]["scores"]] == [0.9]
    only_spans = jsonl(export(keel, project=seeded.project_id, include="spans", limit=3))
    assert all("spans" in x and "scores" not in x for x in only_spans)


def test_csv_export_is_flat_with_a_header(keel: Keel, seeded: Seeded) -> None:
    r = export(keel, format="csv", project=seeded.project_id)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"].endswith('.csv"')
    lines = r.text.split("\r\n")
    assert lines[0] == ",".join(CSV_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(r.text)))
    want = listed(keel, project=seeded.project_id)
    assert len(rows) == N_TRACES
    for got, exp in zip(rows, want, strict=True):
        assert got["trace_id"] == exp["trace_id"] and got["model"] == exp["model"]
        assert got["input_tokens"] == str(exp["input_tokens"]) and got["status"] == exp["status"]
        assert orjson.loads(got["tags"]) == exp["tags"]
        assert got["error"] == (exp["error"] or "")
        assert float(got["latency_ms"]) == exp["latency_ms"]
        assert got["cost_usd"] == ("" if exp["cost_usd"] is None else repr(exp["cost_usd"]))
    formula = next(x for x in rows if x["trace_id"] == seeded.formula_trace)
    assert formula["name"] == "'=HYPERLINK(1)"  # a spreadsheet shows it, never evaluates it


@pytest.mark.parametrize(
    ("params", "status", "fragment"),
    [
        ({"format": "xml"}, 400, "format"),
        ({"format": "csv", "include": "spans"}, 400, "JSONL only"),
        ({"include": "spans,logs"}, 400, "logs"),
        ({"start": "last tuesday"}, 400, "start"),
        ({"status": "meh"}, 400, "status"),
        ({"limit": "0"}, 400, "limit"),
        ({"project": "no-such-project-anywhere"}, 404, "not found"),
    ],
)
def test_bad_export_requests_are_clear_errors(
    keel: Keel, params: dict[str, str], status: int, fragment: str
) -> None:
    r = export(keel, **params)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


def test_a_virtual_key_exports_its_project_only(keel: Keel, seeded: Seeded) -> None:
    key = keel.create_key(project=seeded.project)["key"]
    other = keel.create_key(project=f"elsewhere-{uuid.uuid4().hex[:6]}")["key"]
    auth = {"authorization": f"Bearer {key}"}
    rows = jsonl(export(keel, headers=auth, project="ignored-for-virtual-keys", model="cheap"))
    assert {x["project_id"] for x in rows} == {seeded.project_id}
    assert len(rows) == len(listed(keel, project=seeded.project_id, model="cheap"))
    assert jsonl(export(keel, headers={"authorization": f"Bearer {other}"})) == []
    r = httpx.get(keel.url + "/api/traces/export")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_batches_hold_one_page_at_a_time(keel: Keel, seeded: Seeded) -> None:
    f = TraceFilter(project_id=seeded.project_id)
    sizes = [len(b) for b in iter_trace_batches(keel.store, f)]
    assert sizes == [EXPORT_BATCH, EXPORT_BATCH, 203]
    assert [len(b) for b in iter_trace_batches(keel.store, f, batch=100, limit=250)] == [100, 100, 50]
    assert list(iter_trace_batches(keel.store, TraceFilter(project_id="proj_nothing_here"))) == []


def test_cli_export(keel: Keel, seeded: Seeded, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KEEL_DATABASE_URL": database_url(keel.app.state.settings),
        "KEEL_DATA_DIR": str(tmp_path),
    }
    env.pop("KEEL_CONFIG", None)
    out = tmp_path / "traces.jsonl"
    cmd = [sys.executable, "-m", "keel.cli", "traces", "export", "--project", seeded.project]
    r = subprocess.run(
        [*cmd, "--format", "jsonl", "--out", str(out), "--include", "spans"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"Exported {N_TRACES} traces" in r.stderr
    api = jsonl(export(keel, project=seeded.project, include="spans"))
    assert [orjson.loads(x) for x in out.read_bytes().splitlines()] == api

    out_csv = tmp_path / "traces.csv"
    r = subprocess.run(
        [
            *cmd,
            "--format",
            "csv",
            "--out",
            str(out_csv),
            "--status",
            "error",
            "--start",
            "2000-01-01T00:00:00Z",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    api_csv = export(keel, format="csv", project=seeded.project, status="error", start="2000-01-01T00:00:00Z")
    assert out_csv.read_bytes() == api_csv.content

    bad = subprocess.run(
        [*cmd, "--format", "csv", "--out", str(out_csv), "--include", "spans"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--include needs --format jsonl" in bad.stderr
    bad = subprocess.run(
        [*cmd, "--out", str(out_csv), "--start", "soon"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr and "Traceback" not in bad.stderr
