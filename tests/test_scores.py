"""Scores (/api/scores), public keys, end-user feedback (/api/public/feedback) with CORS, the trace page's
Scores section. Real HTTP against keel on both backends; the official SDKs for the gateway routes; headless
chromium posting feedback cross-origin from a page served on another port.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import httpx
import openai
import pytest
from playwright.sync_api import Page

from tests.conftest import BACKENDS, Keel, make_keel

# -- helpers ------------------------------------------------------------------------------------


def make_trace(k: Keel, key: str | None = None, user: str | None = None) -> dict[str, Any]:
    """One chat completion through the gateway (official openai SDK); the stored trace."""
    client = openai.OpenAI(base_url=k.url + "/v1", api_key=key or k.master_key, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "rate me"}], user=user or "scorer"
    )
    return k.wait_for_trace(raw.headers["x-keel-trace-id"])


def post_score(k: Keel, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return k.http.post("/api/scores", json=body, headers=headers)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


def feedback(url: str, key: str | None, body: Any, origin: str | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    if origin:
        headers["origin"] = origin
    content = body if isinstance(body, bytes) else httpx.Request("POST", url, json=body).content
    return httpx.post(url + "/api/public/feedback", content=content, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def trace(keel: Keel) -> dict[str, Any]:
    return make_trace(keel)


@pytest.fixture(scope="module")
def public_key(keel: Keel) -> str:
    r = keel.http.post("/api/keys", json={"project": "default", "name": "widget", "kind": "public"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "public" and body["key"].startswith("pk-keel-")
    return str(body["key"])


# -- /api/scores --------------------------------------------------------------------------------


def test_scores_of_each_type_show_on_the_trace(keel: Keel, trace: dict[str, Any]) -> None:
    tid, span = trace["trace_id"], trace["spans"][0]["span_id"]
    r1 = post_score(keel, trace_id=tid, name="correctness", value=0.75, comment="mostly right", source="eval")
    r2 = post_score(keel, trace_id=tid.upper(), name="helpful", value=True, source="human")
    r3 = post_score(keel, trace_id=tid, span_id=span, name="tone", value="friendly")
    r4 = post_score(keel, trace_id=tid, name="passed", value=1, data_type="boolean")
    for r in (r1, r2, r3, r4):
        assert r.status_code == 201, r.text
    s1, s2, s3, s4 = r1.json(), r2.json(), r3.json(), r4.json()
    assert (s1["data_type"], s1["value"], s1["source"], s1["comment"]) == (
        "numeric",
        0.75,
        "eval",
        "mostly right",
    )
    assert (s2["data_type"], s2["value"], s2["trace_id"]) == ("boolean", True, tid)
    assert (s3["data_type"], s3["value"], s3["span_id"], s3["source"]) == (
        "categorical",
        "friendly",
        span,
        "api",
    )
    assert (s4["data_type"], s4["value"]) == ("boolean", True)
    assert (
        s1["author"] == "master" and s1["project_id"] == trace["project_id"] and s1["id"].startswith("score_")
    )

    detail = keel.http.get(f"/api/traces/{tid}").json()
    got = {s["name"]: s for s in detail["scores"]}
    assert got["correctness"]["value"] == 0.75 and got["helpful"]["value"] is True
    assert got["tone"]["value"] == "friendly" and got["tone"]["span_id"] == span
    assert [s["id"] for s in detail["scores"]][:3] == [s1["id"], s2["id"], s3["id"]]  # oldest first


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"name": "x", "value": 1}, "trace_id"),
        ({"trace_id": "nothex", "name": "x", "value": 1}, "trace_id"),
        ({"trace_id": "T", "value": 1}, "name"),
        ({"trace_id": "T", "name": "x"}, "value"),
        ({"trace_id": "T", "name": "x", "value": "high", "data_type": "numeric"}, "number"),
        ({"trace_id": "T", "name": "x", "value": 0.5, "data_type": "boolean"}, "true or false"),
        ({"trace_id": "T", "name": "x", "value": True, "data_type": "categorical"}, "label"),
        ({"trace_id": "T", "name": "x", "value": "", "data_type": "categorical"}, "label"),
        ({"trace_id": "T", "name": "x", "value": 1, "source": "robot"}, "source"),
        ({"trace_id": "T", "name": "x", "value": 1, "colour": "red"}, "colour"),
        ({"trace_id": "T", "name": "x", "value": [1, 2]}, "value"),
    ],
)
def test_bad_scores_are_400_in_openai_shape(
    keel: Keel, trace: dict[str, Any], body: dict[str, Any], fragment: str
) -> None:
    body = {k: (trace["trace_id"] if v == "T" else v) for k, v in body.items()}
    err = assert_openai_error(post_score(keel, **body), 400)
    assert err["type"] == "invalid_request_error" and fragment in err["message"], err


def test_non_json_and_non_finite_scores_are_400(keel: Keel, trace: dict[str, Any]) -> None:
    r = keel.http.post("/api/scores", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    raw = b'{"trace_id": "%s", "name": "x", "value": NaN}' % trace["trace_id"].encode()
    r = keel.http.post("/api/scores", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_unknown_trace_or_span_is_404(keel: Keel, trace: dict[str, Any]) -> None:
    assert_openai_error(post_score(keel, trace_id="0" * 32, name="x", value=1), 404, "not_found")
    r = post_score(keel, trace_id=trace["trace_id"], span_id="f" * 16, name="x", value=1)
    assert_openai_error(r, 404, "not_found")


def test_list_scores_filters_and_pages(keel: Keel) -> None:
    t = make_trace(keel)
    tid = t["trace_id"]
    run = uuid.uuid4().hex[:8]
    made = []
    for i in range(7):
        src = ("human", "api", "eval")[i % 3]
        r = post_score(keel, trace_id=tid, name=f"q-{run}", value=float(i), source=src)
        assert r.status_code == 201
        made.append(r.json())
    post_score(keel, trace_id=tid, name=f"other-{run}", value="x")

    page = keel.http.get("/api/scores", params={"trace_id": tid, "name": f"q-{run}"}).json()
    assert [s["id"] for s in page["data"]] == [s["id"] for s in reversed(made)]  # newest first
    assert page["next_cursor"] is None
    evals = keel.http.get("/api/scores", params={"name": f"q-{run}", "source": "eval"}).json()["data"]
    assert sorted(s["value"] for s in evals) == [2.0, 5.0]
    cats = keel.http.get("/api/scores", params={"trace_id": tid, "data_type": "categorical"}).json()["data"]
    assert [s["name"] for s in cats] == [f"other-{run}"]

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"name": f"q-{run}", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = keel.http.get("/api/scores", params=params).json()
        seen += [s["id"] for s in body["data"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == [s["id"] for s in reversed(made)]

    first = made[0]["created_at"]
    later = keel.http.get("/api/scores", params={"name": f"q-{run}", "start": first}).json()["data"]
    assert len(later) == 7
    none = keel.http.get("/api/scores", params={"name": f"q-{run}", "end": first}).json()["data"]
    assert none == []
    assert_openai_error(keel.http.get("/api/scores", params={"cursor": "!!"}), 400, "invalid_cursor")
    assert_openai_error(keel.http.get("/api/scores", params={"start": "yesterday"}), 400, "invalid_time")
    assert_openai_error(keel.http.get("/api/scores", params={"source": "robot"}), 400)
    assert_openai_error(keel.http.get("/api/scores", params={"limit": 0}), 400)


def test_delete_score(keel: Keel, trace: dict[str, Any]) -> None:
    s = post_score(keel, trace_id=trace["trace_id"], name="to-delete", value=2).json()
    r = keel.http.delete(f"/api/scores/{s['id']}")
    assert r.status_code == 200 and r.json()["id"] == s["id"]
    assert_openai_error(keel.http.delete(f"/api/scores/{s['id']}"), 404, "not_found")
    names = [x["name"] for x in keel.http.get(f"/api/traces/{trace['trace_id']}").json()["scores"]]
    assert "to-delete" not in names


def test_a_virtual_key_scores_only_its_project(keel: Keel) -> None:
    run = uuid.uuid4().hex[:8]
    a = keel.create_key(project=f"score-a-{run}")["key"]
    b = keel.create_key(project=f"score-b-{run}")["key"]
    ta = make_trace(keel, key=a)
    tb = make_trace(keel, key=b)
    mine = post_score(keel, key=a, trace_id=ta["trace_id"], name="n", value=1)
    assert mine.status_code == 201 and mine.json()["author"].startswith("key_")
    assert_openai_error(post_score(keel, key=a, trace_id=tb["trace_id"], name="n", value=1), 404)
    theirs = post_score(keel, key=b, trace_id=tb["trace_id"], name="n", value=2).json()
    listed = keel.http.get("/api/scores", headers={"authorization": f"Bearer {a}"}).json()["data"]
    assert {s["trace_id"] for s in listed} == {ta["trace_id"]}
    r = keel.http.delete(f"/api/scores/{theirs['id']}", headers={"authorization": f"Bearer {a}"})
    assert_openai_error(r, 404)
    assert (
        keel.http.get("/api/scores", params={"trace_id": tb["trace_id"]}).json()["data"][0]["id"]
        == theirs["id"]
    )


# -- public keys --------------------------------------------------------------------------------


def test_a_public_key_is_refused_everywhere_but_feedback(keel: Keel, public_key: str) -> None:
    oai = openai.OpenAI(base_url=keel.url + "/v1", api_key=public_key, max_retries=0, timeout=30)
    with pytest.raises(openai.PermissionDeniedError) as info:
        oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.json()["error"]["code"] == "public_key"
    with pytest.raises(openai.PermissionDeniedError):
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    with pytest.raises(openai.PermissionDeniedError):
        oai.embeddings.create(model="text-embedding-3-small", input="hi")
    with pytest.raises(openai.PermissionDeniedError):
        oai.models.list()
    claude = anthropic.Anthropic(base_url=keel.url, api_key=public_key, max_retries=0, timeout=30)
    with pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.create(
            model="claude-haiku", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )

    auth = {"authorization": f"Bearer {public_key}"}
    for method, path in [
        ("GET", "/api/traces"),
        ("GET", "/api/scores"),
        ("POST", "/api/scores"),
        ("GET", "/api/keys"),
        ("GET", "/api/projects"),
        ("GET", "/api/usage"),
        ("GET", "/api/retention"),
        ("GET", "/api/traces/export"),
        ("GET", "/openapi.json"),
        ("GET", "/metrics"),
    ]:
        r = httpx.request(method, keel.url + path, headers=auth, json={} if method == "POST" else None)
        assert_openai_error(r, 403)
    # OTLP ingest refuses it too (it authenticates with keys.lookup, which never returns a public key)
    r = httpx.post(
        keel.url + "/v1/traces", content=b"{}", headers={**auth, "content-type": "application/json"}
    )
    assert r.status_code in (401, 403), r.text
    # the UI does not let it in either
    r = httpx.post(keel.url + "/login", data={"key": public_key}, headers={"origin": keel.url})
    assert r.status_code == 403 and "public key" in r.text
    r = httpx.get(keel.url + "/traces", cookies={"keel_key": public_key})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    # listed like any key, with its kind
    listed = {k["key_prefix"]: k for k in keel.http.get("/api/keys").json()}
    assert listed[public_key[:12]]["kind"] == "public"


def test_a_public_key_takes_no_models_or_limits(keel: Keel) -> None:
    r = keel.http.post("/api/keys", json={"name": "w", "kind": "public", "models": ["gpt-4o-mini"]})
    assert_openai_error(r, 400)
    assert_openai_error(keel.http.post("/api/keys", json={"name": "w", "kind": "shared"}), 400)


def test_feedback_with_a_public_key(keel: Keel, public_key: str) -> None:
    secret = keel.create_key(project="default")["key"]
    t = make_trace(keel, key=secret)  # the public key's project
    tid = t["trace_id"]
    up = feedback(keel.url, public_key, {"trace_id": tid, "value": "up", "comment": "spot on", "user": "u-1"})
    assert up.status_code == 201, up.text
    assert up.headers["access-control-allow-origin"] == "*"
    s = up.json()
    assert (s["name"], s["data_type"], s["value"], s["source"]) == ("user_feedback", "boolean", True, "human")
    assert (s["comment"], s["author"], s["trace_id"]) == ("spot on", "u-1", tid)
    down = feedback(keel.url, public_key, {"trace_id": tid.upper(), "value": False})
    assert down.status_code == 201 and down.json()["value"] is False
    named = feedback(keel.url, public_key, {"trace_id": tid, "value": "down", "name": "answer_quality"})
    assert named.status_code == 201 and named.json()["name"] == "answer_quality"

    scores = keel.http.get("/api/scores", params={"trace_id": tid}).json()["data"]
    assert sorted((x["name"], x["value"]) for x in scores) == [
        ("answer_quality", False),
        ("user_feedback", False),
        ("user_feedback", True),
    ]
    # a secret key may post feedback too (server-side apps)
    assert feedback(keel.url, secret, {"trace_id": tid, "value": "up"}).status_code == 201


def test_feedback_is_confined_to_the_keys_project(keel: Keel) -> None:
    run = uuid.uuid4().hex[:8]
    other = make_trace(keel, key=keel.create_key(project=f"fb-other-{run}")["key"])
    pk = keel.http.post("/api/keys", json={"project": f"fb-mine-{run}", "kind": "public"}).json()["key"]
    r = feedback(keel.url, pk, {"trace_id": other["trace_id"], "value": "up"})
    assert_openai_error(r, 404, "not_found")
    assert keel.http.get("/api/scores", params={"trace_id": other["trace_id"]}).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "invalid_json"),
        ({"trace_id": "abc", "value": "up"}, 400, "invalid_request"),
        ({"trace_id": "0" * 32, "value": "sideways"}, 400, "invalid_request"),
        ({"trace_id": "0" * 32, "value": 1}, 400, "invalid_request"),
        ({"trace_id": "0" * 32, "value": "up", "extra": 1}, 400, "invalid_request"),
        ({"trace_id": "0" * 32, "value": "up", "name": "has space"}, 400, "invalid_request"),
        ({"trace_id": "0" * 32, "value": "up"}, 404, "not_found"),
        (
            b'{"trace_id": "' + b"0" * 32 + b'", "value": "up", "comment": "' + b"x" * 20_000 + b'"}',
            413,
            None,
        ),
    ],
)
def test_bad_feedback_is_a_clear_error_readable_cross_origin(
    keel: Keel, public_key: str, body: Any, status: int, code: str | None
) -> None:
    r = feedback(keel.url, public_key, body, origin="http://shop.example")
    err = assert_openai_error(r, status, code)
    assert err["message"]
    assert r.headers["access-control-allow-origin"] == "*"


def test_feedback_needs_a_valid_key(keel: Keel, trace: dict[str, Any]) -> None:
    body = {"trace_id": trace["trace_id"], "value": "up"}
    assert_openai_error(feedback(keel.url, None, body), 401, "missing_api_key")
    assert_openai_error(feedback(keel.url, "pk-keel-not-a-key", body), 401, "invalid_api_key")
    revoked = keel.http.post("/api/keys", json={"kind": "public"}).json()
    keel.http.delete(f"/api/keys/{revoked['id']}")
    assert_openai_error(feedback(keel.url, revoked["key"], body), 401, "invalid_api_key")


def test_feedback_preflight(keel: Keel) -> None:
    r = httpx.options(
        keel.url + "/api/public/feedback",
        headers={
            "origin": "http://shop.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {
        h.strip() for h in r.headers["access-control-allow-headers"].split(",")
    }
    # other API routes stay same-origin: no CORS headers
    r = keel.http.get("/api/scores", headers={"origin": "http://shop.example"})
    assert "access-control-allow-origin" not in r.headers


# -- a keel with restricted origins and a low feedback rate ------------------------------------------------


class _Pages(BaseHTTPRequestHandler):
    """Serves the test shop's page (another origin than keel's)."""

    html = b""

    def do_GET(self) -> None:
        body = self.html if self.path.startswith("/shop") else b"not here"
        self.send_response(200 if self.path.startswith("/shop") else 404)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


SHOP_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>shop</title></head><body>
<p id="answer">An answer from the LLM.</p>
<button id="up">Thumbs up</button> <button id="down">Thumbs down</button>
<output id="result">waiting</output>
<script>
const q = new URLSearchParams(location.search);
async function send(value) {
  const out = document.getElementById("result");
  try {
    const r = await fetch(q.get("keel") + "/api/public/feedback", {
      method: "POST",
      headers: {"authorization": "Bearer " + q.get("key"), "content-type": "application/json"},
      body: JSON.stringify({trace_id: q.get("trace"), value: value, comment: "from the shop page"}),
    });
    const body = await r.json();
    out.textContent = r.status + " " + (body.id || body.error.code);
  } catch (e) {
    out.textContent = "blocked " + e.name;
  }
}
document.getElementById("up").addEventListener("click", () => send("up"));
document.getElementById("down").addEventListener("click", () => send("down"));
</script></body></html>"""


@pytest.fixture(scope="module")
def shop_servers() -> Iterator[list[str]]:
    """Two pages on two more localhost ports: the allowed origin and a stranger."""
    _Pages.html = SHOP_PAGE
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Pages) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


@pytest.fixture(scope="module", params=BACKENDS)
def strict_keel(
    request: pytest.FixtureRequest,
    mock_upstream: Any,
    tmp_path_factory: pytest.TempPathFactory,
    shop_servers: list[str],
) -> Iterator[Keel]:
    backend = request.param
    server, app = make_keel(
        backend,
        tmp_path_factory.mktemp(f"strict-{backend}"),
        mock_upstream,
        request,
        feedback_cors_origins=f"{shop_servers[0]}, http://other.example",
        feedback_rpm=4,
    )
    k = Keel(server, app, backend)
    try:
        yield k
    finally:
        k.http.close()
        server.stop()


def _pk(k: Keel) -> str:
    r = k.http.post("/api/keys", json={"project": "default", "name": "shop", "kind": "public"})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


@pytest.mark.ui
def test_browser_posts_feedback_cross_origin(strict_keel: Keel, shop_servers: list[str], page: Page) -> None:
    k = strict_keel
    t = make_trace(k, key=k.create_key(project="default")["key"])
    pk = _pk(k)
    page.goto(f"{shop_servers[0]}/shop?keel={k.url}&key={pk}&trace={t['trace_id']}")
    page.click("#down")
    page.wait_for_function("document.getElementById('result').textContent !== 'waiting'")
    text = page.text_content("#result") or ""
    assert re.fullmatch(r"201 score_[0-9a-f]+", text), text
    scores = k.http.get("/api/scores", params={"trace_id": t["trace_id"]}).json()["data"]
    assert [(s["name"], s["value"], s["source"], s["comment"]) for s in scores] == [
        ("user_feedback", False, "human", "from the shop page")
    ]

    # a page on an origin that is not configured: the browser blocks the call, nothing is stored
    page.goto(f"{shop_servers[1]}/shop?keel={k.url}&key={pk}&trace={t['trace_id']}")
    page.click("#up")
    page.wait_for_function("document.getElementById('result').textContent !== 'waiting'")
    assert (page.text_content("#result") or "").startswith("blocked")
    assert len(k.http.get("/api/scores", params={"trace_id": t["trace_id"]}).json()["data"]) == 1


def test_restricted_origins_on_preflight_and_post(strict_keel: Keel, shop_servers: list[str]) -> None:
    k = strict_keel
    pre = {"access-control-request-method": "POST"}
    ok = httpx.options(k.url + "/api/public/feedback", headers={**pre, "origin": shop_servers[0]})
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == shop_servers[0]
    assert ok.headers["vary"] == "Origin"
    other = httpx.options(k.url + "/api/public/feedback", headers={**pre, "origin": "http://other.example"})
    assert other.status_code == 204 and other.headers["access-control-allow-origin"] == "http://other.example"
    bad = httpx.options(k.url + "/api/public/feedback", headers={**pre, "origin": shop_servers[1]})
    assert_openai_error(bad, 403, "cors_origin")
    assert "access-control-allow-origin" not in bad.headers


def test_feedback_is_rate_limited_per_key(strict_keel: Keel) -> None:
    k = strict_keel
    t = make_trace(k, key=k.create_key(project="default")["key"])
    pk, other = _pk(k), _pk(k)
    body = {"trace_id": t["trace_id"], "value": "up"}
    statuses = [feedback(k.url, pk, body).status_code for _ in range(4)]
    assert statuses == [201] * 4
    r = feedback(k.url, pk, body, origin="http://other.example")
    err = assert_openai_error(r, 429, "rate_limit_exceeded:feedback:rpm")
    assert err["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["access-control-allow-origin"] == "http://other.example"
    assert feedback(k.url, other, body).status_code == 201  # per key
    assert len(k.http.get("/api/scores", params={"trace_id": t["trace_id"]}).json()["data"]) == 5


# -- the trace page ----------------------------------------------------------------------------------------


@pytest.mark.ui
def test_trace_page_shows_scores(keel: Keel, page: Page) -> None:
    t = make_trace(keel)
    tid, span = t["trace_id"], t["spans"][0]["span_id"]
    post_score(keel, trace_id=tid, name="correctness", value=0.5, source="eval", comment="half right")
    post_score(keel, trace_id=tid, name="user_feedback", value=True, source="human")
    post_score(keel, trace_id=tid, span_id=span, name="tone", value="<b>warm</b>")

    page.goto(keel.url + "/login")
    page.fill("#key", keel.master_key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(r"/traces(\?.*)?$"))
    page.goto(f"{keel.url}/traces/{tid}")
    section = page.locator("[data-testid=trace-scores]")
    assert "Scores" in (section.locator("h2").text_content() or "")
    rows = section.locator("[data-testid=score-row]")
    assert rows.count() == 3
    texts = [rows.nth(i).inner_text() for i in range(3)]
    assert "correctness" in texts[0] and "0.5" in texts[0] and "eval" in texts[0] and "half right" in texts[0]
    assert "user_feedback" in texts[1] and "yes" in texts[1] and "human" in texts[1]
    assert "tone" in texts[2] and "<b>warm</b>" in texts[2] and span in texts[2]  # escaped, shown as text

    bare = make_trace(keel)
    page.goto(f"{keel.url}/traces/{bare['trace_id']}")
    page.wait_for_selector("[data-testid=span-tree]")
    assert page.locator("[data-testid=trace-scores]").count() == 0


def test_cli_creates_public_keys(tmp_path: Any) -> None:
    env = {**os.environ, "KEEL_DATA_DIR": str(tmp_path), "KEEL_DATABASE_URL": f"sqlite:///{tmp_path}/k.db"}
    env.pop("KEEL_CONFIG", None)
    keel_cli = [sys.executable, "-m", "keel.cli", "keys"]
    r = subprocess.run(
        [*keel_cli, "create", "--project", "shop", "--public"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("pk-keel-")
    r = subprocess.run([*keel_cli, "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert '"kind": "public"' in r.stdout
    r = subprocess.run(
        [*keel_cli, "create", "--public", "--models", "gpt-4o-mini"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "public key takes no" in r.stderr
