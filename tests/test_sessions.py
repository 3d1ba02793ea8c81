"""Sessions and end users: /api/sessions and /api/users over traces made through the gateway.

Traffic goes through keel with the official openai SDK (``user`` field, ``x-keel-session-id``
header); pagination edge cases (many sessions, equal start times) are seeded with Store.write_spans.
Runs on SQLite and on PostgreSQL + Redis (the ``keel`` fixture).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest

from keel.store import sessions, utcnow


@dataclass
class Convo:
    run: str
    project: str
    key: str
    other_key: str
    user: str
    long_session: str
    short_session: str
    other_session: str
    # trace id -> the user message sent in it, in order, for the long session
    turns: list[tuple[str, str]] = field(default_factory=list)
    error_trace: str = ""
    short_trace: str = ""


def _client(keel: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=keel.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _api(keel: Any, key: str) -> httpx.Client:
    return httpx.Client(base_url=keel.url, headers={"authorization": f"Bearer {key}"}, timeout=30)


def _wait_count(keel: Any, params: dict[str, Any], n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows: list[dict[str, Any]] = keel.http.get("/api/traces", params={**params, "limit": 500}).json()[
            "data"
        ]
        if len(rows) >= n:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} of {n} traces stored for {params}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def convo(keel: Any) -> Convo:
    run = uuid.uuid4().hex[:8]
    project, other = f"sess-{run}", f"sess-other-{run}"
    key = keel.create_key(project=project, name="sessions")["key"]
    other_key = keel.create_key(project=other, name="sessions-other")["key"]
    c = Convo(
        run=run,
        project=project,
        key=key,
        other_key=other_key,
        user=f"alice-{run}",
        long_session=f"chat-{run}-long",
        short_session=f"chat-{run}-short",
        other_session=f"chat-{run}-other",
    )
    client = _client(keel, key)
    history: list[dict[str, str]] = []
    for i, text in enumerate(["What is a keel", "And a rudder", "Which one steers"]):
        history.append({"role": "user", "content": f"{text} {run} turn{i}"})
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=history,
            user=c.user,
            extra_headers={"x-keel-session-id": c.long_session},
        )
        reply = raw.parse().choices[0].message.content or ""
        history.append({"role": "assistant", "content": reply})
        c.turns.append((raw.headers["x-keel-trace-id"], history[-2]["content"]))
        keel.wait_for_trace(c.turns[-1][0])
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="fault-500",
            messages=[{"role": "user", "content": f"this fails {run}"}],
            user=c.user,
            extra_headers={"x-keel-session-id": c.long_session},
        )
    c.error_trace = info.value.response.headers["x-keel-trace-id"]
    keel.wait_for_trace(c.error_trace)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"short one {run}"}],
        user=c.user,
        extra_headers={"x-keel-session-id": c.short_session},
    )
    c.short_trace = raw.headers["x-keel-trace-id"]
    keel.wait_for_trace(c.short_trace)
    raw = _client(keel, other_key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"other project {run}"}],
        user=f"bob-{run}",
        extra_headers={"x-keel-session-id": c.other_session},
    )
    keel.wait_for_trace(raw.headers["x-keel-trace-id"])
    return c


def test_session_list_totals_and_order(keel: Any, convo: Convo) -> None:
    with _api(keel, convo.key) as api:
        r = api.get("/api/sessions")
        assert r.status_code == 200, r.text
        body = r.json()
        rows = body["data"]
        # the virtual key sees its project's two sessions, most recently active first
        assert [s["session_id"] for s in rows] == [convo.short_session, convo.long_session]
        assert body["next_cursor"] is None
    traces = _wait_count(keel, {"session": convo.long_session}, 4)
    long = rows[1]
    assert long["user"] == convo.user
    assert long["trace_count"] == 4 and long["errors"] == 1
    assert long["input_tokens"] == sum(t["input_tokens"] for t in traces)
    assert long["output_tokens"] == sum(t["output_tokens"] for t in traces)
    assert long["total_tokens"] == long["input_tokens"] + long["output_tokens"] > 0
    assert long["cost_usd"] == pytest.approx(sum(t["cost_usd"] or 0.0 for t in traces))
    assert long["first_time"] == min(t["start_time"] for t in traces)
    assert long["last_time"] == max(t["start_time"] for t in traces)
    assert rows[0]["trace_count"] == 1 and rows[0]["errors"] == 0

    # the master key sees every project's sessions; ?project narrows to one, ?user to one user
    r = keel.http.get("/api/sessions", params={"user": convo.user})
    assert [s["session_id"] for s in r.json()["data"]] == [convo.short_session, convo.long_session]
    r = keel.http.get("/api/sessions", params={"project": f"sess-other-{convo.run}"})
    assert [s["session_id"] for s in r.json()["data"]] == [convo.other_session]


def test_session_detail_is_the_conversation_in_order(keel: Any, convo: Convo) -> None:
    with _api(keel, convo.key) as api:
        r = api.get(f"/api/sessions/{convo.long_session}")
        assert r.status_code == 200, r.text
        s = r.json()
    assert s["session_id"] == convo.long_session and s["trace_count"] == 4
    ids = [t["trace_id"] for t in s["traces"]]
    assert ids == [tid for tid, _ in convo.turns] + [convo.error_trace]
    for t, (_, sent) in zip(s["traces"], convo.turns, strict=False):
        assert t["input_text"] == sent  # the last user message, not the whole history
        assert t["output_text"] == f"Mock reply to: {sent}"
    failed = s["traces"][-1]
    assert failed["status"] == "error" and failed["input_text"] == f"this fails {convo.run}"
    assert failed["output_text"] is None

    # traces page through with a cursor, oldest first
    r = keel.http.get(f"/api/sessions/{convo.long_session}", params={"limit": 3})
    first = r.json()
    assert [t["trace_id"] for t in first["traces"]] == ids[:3] and first["next_cursor"]
    r = keel.http.get(
        f"/api/sessions/{convo.long_session}", params={"limit": 3, "cursor": first["next_cursor"]}
    )
    assert [t["trace_id"] for t in r.json()["traces"]] == ids[3:] and r.json()["next_cursor"] is None


def test_users_list_and_detail(keel: Any, convo: Convo) -> None:
    with _api(keel, convo.key) as api:
        rows = api.get("/api/users").json()["data"]
        assert [u["user"] for u in rows] == [convo.user]  # bob is in the other project
        u = rows[0]
        assert u["trace_count"] == 5 and u["session_count"] == 2 and u["errors"] == 1
        r = api.get(f"/api/users/{convo.user}")
        assert r.status_code == 200, r.text
        d = r.json()
    assert d["user"] == convo.user and d["trace_count"] == 5 and d["session_count"] == 2
    assert d["first_time"] <= d["last_time"] and d["total_tokens"] == u["total_tokens"] > 0
    assert d["cost_usd"] == pytest.approx(u["cost_usd"])
    assert {m["model"]: m["trace_count"] for m in d["models"]} == {"gpt-4o-mini": 4, "fault-500": 1}
    assert d["traces"][0]["trace_id"] == convo.short_trace and len(d["traces"]) == 5
    assert [s["session_id"] for s in d["sessions"]] == [convo.short_session, convo.long_session]


def test_project_isolation(keel: Any, convo: Convo) -> None:
    with _api(keel, convo.other_key) as api:
        assert [s["session_id"] for s in api.get("/api/sessions").json()["data"]] == [convo.other_session]
        assert [u["user"] for u in api.get("/api/users").json()["data"]] == [f"bob-{convo.run}"]
        r = api.get(f"/api/sessions/{convo.long_session}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert api.get(f"/api/users/{convo.user}").status_code == 404
        # a virtual key cannot widen its scope with ?project
        r = api.get("/api/sessions", params={"project": convo.project})
        assert [s["session_id"] for s in r.json()["data"]] == [convo.other_session]
    r = keel.http.get(f"/api/sessions/{convo.long_session}")
    assert r.status_code == 200  # the master key sees all


def test_bad_input_is_a_clear_4xx(keel: Any, convo: Convo) -> None:
    for path, params in (
        ("/api/sessions", {"cursor": "not-a-cursor"}),
        ("/api/users", {"cursor": "%%%"}),
        (f"/api/sessions/{convo.long_session}", {"cursor": "zzz"}),
        ("/api/sessions", {"start": "yesterday"}),
        ("/api/users", {"limit": 0}),
    ):
        r = keel.http.get(path, params=params)
        assert r.status_code == 400, (path, params, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert keel.http.get("/api/sessions", params={"project": "no-such-project"}).status_code == 404
    assert keel.http.get("/api/users/nobody-" + convo.run).status_code == 404
    assert httpx.get(keel.url + "/api/sessions").status_code == 401


def _span(tid: str, sid: str, user: str, project: str, when: Any, tokens: int) -> dict[str, Any]:
    return {
        "trace_id": tid,
        "span_id": tid[:16],
        "parent_span_id": None,
        "project_id": project,
        "name": "chat",
        "kind": "llm",
        "start_time": when,
        "end_time": when + timedelta(milliseconds=5),
        "latency_ms": 5.0,
        "status": "ok",
        "model": "gpt-4o-mini",
        "input_tokens": tokens,
        "output_tokens": 1,
        "cost_usd": 0.001,
        "user": user,
        "session_id": sid,
    }


def test_pagination_walks_every_session_once_with_ties(keel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """60 sessions of 1-4 traces, many sharing start times: pages of 7 list each exactly once, in order."""
    run = uuid.uuid4().hex[:8]
    project = keel.store.ensure_project(f"bulk-{run}")
    t0 = utcnow() - timedelta(days=1)
    spans = []
    for i in range(60):
        for j in range(1 + i % 4):
            # several sessions end at the same instant: the cursor must break ties by id
            when = t0 + timedelta(seconds=(i // 3) * 10 - j)
            spans.append(_span(uuid.uuid4().hex, f"bulk-{run}-{i:02d}", f"u{i % 5}-{run}", project, when, i))
    keel.store.write_spans(spans)
    last: dict[str, Any] = {}
    for sp in spans:
        last[sp["session_id"]] = max(last.get(sp["session_id"], sp["start_time"]), sp["start_time"])
    expected = sorted(last, key=lambda s: (last[s], s), reverse=True)

    for chunk in (500, 4):  # the scan reads traces in chunks: small ones cross chunk edges often
        monkeypatch.setattr(sessions, "_SCAN_CHUNK", chunk)
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"project": project, "limit": 7}
            if cursor:
                params["cursor"] = cursor
            body = keel.http.get("/api/sessions", params=params).json()
            seen += [s["session_id"] for s in body["data"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == expected, chunk

    users_seen: list[str] = []
    cursor = None
    while True:
        params = {"project": project, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        body = keel.http.get("/api/users", params=params).json()
        users_seen += [u["user"] for u in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(users_seen) == sorted({f"u{i}-{run}" for i in range(5)}) and len(users_seen) == 5
    counts = {u["user"]: u for u in keel.http.get("/api/users", params={"project": project}).json()["data"]}
    assert counts[f"u0-{run}"]["trace_count"] == sum(1 for s in spans if s["user"] == f"u0-{run}")
    assert counts[f"u0-{run}"]["session_count"] == 12

    # a time window counts only the traces inside it
    start = (t0 + timedelta(seconds=100)).isoformat()
    body = keel.http.get("/api/sessions", params={"project": project, "start": start, "limit": 200}).json()
    inside = {s["session_id"] for s in spans if s["start_time"] >= t0 + timedelta(seconds=100)}
    assert {s["session_id"] for s in body["data"]} == inside


def test_openapi_documents_the_routes(keel: Any) -> None:
    doc = keel.http.get("/openapi.json").json()
    for path in ("/api/sessions", "/api/sessions/{session_id}", "/api/users", "/api/users/{user_id}"):
        assert "get" in doc["paths"][path], path
    schemas = doc["components"]["schemas"]
    assert {
        "SessionOut",
        "SessionPage",
        "SessionDetail",
        "EndUserOut",
        "EndUserPage",
        "EndUserDetail",
    } <= set(schemas)
    assert "input_text" in schemas["SessionTurnOut"]["properties"]
    params = {p["name"] for p in doc["paths"]["/api/traces"]["get"]["parameters"]}
    assert {"q", "session", "name", "key", "team", "provider", "prompt", "prompt_version"} <= params
    assert {"min_latency_ms", "max_latency_ms", "min_cost_usd", "max_cost_usd"} <= params
