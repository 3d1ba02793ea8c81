"""The management API: keys, projects, traces (filters, pagination, isolation), OpenAPI, metrics."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import openai
from sqlalchemy import text

from tests.conftest import Keel


def _send(
    keel: Keel, key: str, model: str = "gpt-4o-mini", user: str | None = None, tag: str | None = None
) -> str:
    c = openai.OpenAI(base_url=keel.url + "/v1", api_key=key, max_retries=0)
    headers = {"x-keel-tags": tag} if tag else {}
    try:
        raw = c.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            user=user or openai.NOT_GIVEN,
            extra_headers=headers,
        )
        return str(raw.headers["x-keel-trace-id"])
    except openai.APIStatusError as exc:
        return str(exc.response.headers["x-keel-trace-id"])


def test_unknown_routes_are_openai_shaped_404(keel: Keel) -> None:
    r = keel.http.post("/v1/nothing-here", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_requires_a_key(keel: Keel) -> None:
    for path in ("/api/traces", "/api/keys", "/metrics", "/openapi.json"):
        r = httpx.get(keel.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = httpx.get(keel.url + path, headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_keys_lifecycle_and_secret_never_stored(keel: Keel) -> None:
    created = keel.create_key(
        project="keys-" + uuid.uuid4().hex[:6], models=["gpt-4o-mini", "cheap"], name="ci"
    )
    secret = created["key"]
    assert secret.startswith("sk-keel-") and created["models"] == ["gpt-4o-mini", "cheap"]
    listed = keel.http.get("/api/keys").json()
    mine = [k for k in listed if k["id"] == created["id"]]
    assert len(mine) == 1 and "key" not in mine[0] and mine[0]["status"] == "active"
    assert secret not in keel.http.get("/api/keys").text
    with keel.store.engine.connect() as conn:
        rows = conn.execute(
            text("select key_hash, key_prefix from api_keys where id = :i"), {"i": created["id"]}
        ).all()
    assert rows and rows[0][0] != secret and len(rows[0][0]) == 64 and secret.startswith(rows[0][1])
    revoked = keel.http.delete(f"/api/keys/{created['id']}").json()
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    assert keel.http.delete("/api/keys/key_doesnotexist").status_code == 404


def test_virtual_keys_cannot_manage_keys(keel: Keel) -> None:
    key = keel.create_key(project="nonadmin")["key"]
    h = {"authorization": f"Bearer {key}"}
    assert httpx.get(keel.url + "/api/keys", headers=h).status_code == 403
    assert httpx.post(keel.url + "/api/keys", headers=h, json={"project": "x"}).status_code == 403


def test_bad_api_input_is_400_not_422(keel: Keel) -> None:
    r = keel.http.post("/api/keys", json={"name": ""})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = keel.http.get("/api/traces", params={"limit": 0})
    assert r.status_code == 400
    r = keel.http.get("/api/traces", params={"start": "yesterday"})
    assert r.status_code == 400 and "start" in r.json()["error"]["message"]
    r = keel.http.get("/api/traces", params={"cursor": "!!!"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"


def test_trace_filters_and_pagination(keel: Keel) -> None:
    tag = "f-" + uuid.uuid4().hex[:8]
    user = "u-" + uuid.uuid4().hex[:6]
    ids = [_send(keel, keel.master_key, user=user, tag=tag) for _ in range(5)]
    err = _send(keel, keel.master_key, model="fault-500", user=user, tag=tag)
    cheap = _send(keel, keel.master_key, model="cheap", user=user, tag=tag)
    for t in [*ids, err, cheap]:
        keel.wait_for_trace(t)

    def q(**params: object) -> list[str]:
        r = keel.http.get("/api/traces", params={"tag": tag, **params})
        assert r.status_code == 200, r.text
        return [t["trace_id"] for t in r.json()["data"]]

    assert set(q()) == {*ids, err, cheap}
    assert q(status="error") == [err]
    assert set(q(status="ok")) == {*ids, cheap}
    assert q(model="cheap") == [cheap]
    assert set(q(user=user)) == {*ids, err, cheap}
    assert q(user="someone-else") == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert q(start=future) == []
    assert set(q(start=past, end=future)) == {*ids, err, cheap}
    # cursor pagination walks every trace exactly once, newest first
    seen: list[str] = []
    cursor = None
    while True:
        params = {"tag": tag, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = keel.http.get("/api/traces", params=params).json()
        seen += [t["trace_id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 7 and set(seen) == {*ids, err, cheap}
    starts = [t["start_time"] for t in keel.http.get("/api/traces", params={"tag": tag}).json()["data"]]
    assert starts == sorted(starts, reverse=True)


def test_project_isolation(keel: Keel) -> None:
    a = keel.create_key(project="iso-a-" + uuid.uuid4().hex[:6])
    b = keel.create_key(project="iso-b-" + uuid.uuid4().hex[:6])
    ta, tb = _send(keel, a["key"]), _send(keel, b["key"])
    keel.wait_for_trace(ta)
    keel.wait_for_trace(tb)
    ha = {"authorization": f"Bearer {a['key']}"}
    listed = httpx.get(keel.url + "/api/traces", headers=ha, params={"limit": 500}).json()["data"]
    assert ta in {t["trace_id"] for t in listed} and tb not in {t["trace_id"] for t in listed}
    assert {t["project_id"] for t in listed} == {a["project_id"]}
    assert httpx.get(f"{keel.url}/api/traces/{ta}", headers=ha).status_code == 200
    assert httpx.get(f"{keel.url}/api/traces/{tb}", headers=ha).status_code == 404
    # a project key cannot widen its view with ?project=
    other = httpx.get(keel.url + "/api/traces", headers=ha, params={"project": b["project_id"]}).json()[
        "data"
    ]
    assert tb not in {t["trace_id"] for t in other}


def test_trace_detail_shape(keel: Keel) -> None:
    tid = _send(keel, keel.master_key)
    t = keel.wait_for_trace(tid)
    assert set(t) >= {
        "trace_id",
        "name",
        "start_time",
        "end_time",
        "latency_ms",
        "status",
        "model",
        "provider",
        "user",
        "tags",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost_usd",
        "error",
        "span_count",
        "spans",
    }
    span = t["spans"][0]
    assert set(span) >= {
        "span_id",
        "parent_span_id",
        "kind",
        "model",
        "provider",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "latency_ms",
        "ttft_ms",
        "status",
        "error",
        "input",
        "output",
    }
    assert keel.http.get("/api/traces/" + "0" * 32).status_code == 404


def test_openapi_documents_routes(keel: Keel) -> None:
    assert httpx.get(keel.url + "/openapi.json").status_code == 401
    doc = keel.http.get("/openapi.json").json()
    paths = set(doc["paths"])
    assert {
        "/api/traces",
        "/api/traces/{trace_id}",
        "/api/keys",
        "/api/keys/{key_id}",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
    } <= paths
    assert "TracePage" in doc["components"]["schemas"]


def test_metrics_exposition(keel: Keel) -> None:
    _send(keel, keel.master_key)
    _send(keel, keel.master_key, model="fault-500")
    time.sleep(0.2)
    body = keel.http.get("/metrics").text
    assert 'keel_requests_total{model="gpt-4o-mini",route="/v1/chat/completions",status="200"}' in body
    assert 'keel_errors_total{code="upstream_error",route="/v1/chat/completions"}' in body
    for name in (
        "keel_request_duration_seconds_bucket",
        "keel_overhead_seconds_count",
        "keel_trace_queue_depth",
        "keel_trace_dropped_total",
        "keel_trace_written_total",
        'keel_cost_usd_total{deployment="gpt-4o-mini:openai:gpt-4o-mini",model="gpt-4o-mini"}',
        'keel_tokens_total{direction="input",model="gpt-4o-mini"}',
    ):
        assert name in body, name
