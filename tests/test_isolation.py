"""Strict project isolation: project B's key (and a B user's UI session) calls EVERY route of the app with
project A's ids, and sees nothing of A and changes nothing of A.

The routes are enumerated from the running app (every /api and /v1 route, the UI pages), so a new
route fails this test until it is covered: each path parameter must be in ``PARAMS`` (how to get A's
value for it) and each write route in ``WRITES`` (the body to send).  Unknown parameters fail loudly.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Keel

ADMIN = ["gateway", "ingest", "read", "admin"]
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
# routes that are the same for everyone or that only ever act on the caller's own project
PUBLIC = {"/health", "/static", "/", "/login", "/logout"}


@dataclass
class World:
    """Project A's resources (ids and the secret text A put in them), and B's credentials."""

    run: str
    a: dict[str, str] = field(default_factory=dict)  # project A: names and ids
    b_key: str = ""
    b_project_id: str = ""
    b_public: str = ""
    b_cookies: dict[str, str] = field(default_factory=dict)  # a B admin user's UI session
    a_key: str = ""

    def markers(self) -> set[str]:
        """Strings that only A's data contains: none may reach B."""
        return {v for k, v in self.a.items() if k not in ("label", "item_index") and len(v) >= 6}


def _route_list(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route of the FastAPI app, the gateway's raw routes included."""
    try:
        from fastapi.routing import iter_route_contexts

        routes: list[Any] = list(iter_route_contexts(app.api.routes))
    except ImportError:  # older FastAPI: routes are flat already
        routes = list(app.api.routes)
    out: set[tuple[str, str]] = set()
    for r in routes:
        path = getattr(r, "path", None)
        if path is None:
            continue
        for m in getattr(r, "methods", None) or ["GET"]:
            if m not in ("HEAD", "OPTIONS"):
                out.add((m, path))
    for path in app._fast:  # the gateway's raw-ASGI routes, served before FastAPI
        out.add(("GET" if path in ("/v1/models", "/health") else "POST", path))
    return sorted(out)


# -- how to get A's value of each path parameter (a new parameter must be added here) --------------

PARAMS: dict[str, Callable[[World, str], str]] = {
    "trace_id": lambda w, path: w.a["trace_id"],
    "key_id": lambda w, path: w.a["key_id"],
    "score_id": lambda w, path: w.a["score_id"],
    "project": lambda w, path: w.a["project_id"],
    "name": lambda w, path: w.a["prompt"],
    "label": lambda w, path: "production",
    "ref": lambda w, path: (
        w.a["dataset_id"]
        if "datasets/" in path
        else w.a["run_id"]
        if "/runs/" in path
        else "1"  # a prompt version
    ),
    "run_id": lambda w, path: w.a["run_id"],
    "item_id": lambda w, path: (
        w.a["item_index"]
        if ("annotation-items" in path or path.startswith("/review"))
        else w.a["dataset_item_id"]
    ),
    "queue_id": lambda w, path: w.a["queue_id"],
    "rule_id": lambda w, path: w.a["rule_id"],
    "session_id": lambda w, path: w.a["session"],
    "user_id": lambda w, path: w.a["end_user"],
    "account_id": lambda w, path: w.a["account_id"],
    "path": lambda w, path: "keel.css",
}

# the body of each write route (and query string): aimed at A's resources, or naming A's things
WRITES: dict[str, Callable[[World], dict[str, Any]]] = {
    "POST /api/keys": lambda w: {"json": {"project": w.a["project"], "name": "b-into-a"}},
    "PATCH /api/keys/{key_id}": lambda w: {"json": {"scopes": ["read"]}},
    "DELETE /api/keys/{key_id}": lambda w: {},
    "POST /api/projects": lambda w: {"json": {"name": w.a["project"], "limits": {"rpm": 1}}},
    "PATCH /api/projects/{project}": lambda w: {"json": {"retention_days": 1}},
    "POST /api/teams": lambda w: {
        "json": {"project": w.a["project"], "name": w.a["team"], "limits": {"rpm": 1}}
    },
    "POST /api/scores": lambda w: {"json": {"trace_id": w.a["trace_id"], "name": "b-score", "value": 1}},
    "DELETE /api/scores/{score_id}": lambda w: {},
    "POST /api/public/feedback": lambda w: {"json": {"trace_id": w.a["trace_id"], "value": "down"}},
    "POST /api/prompts": lambda w: {
        "json": {"name": f"b-prompt-{w.run}", "type": "text", "template": "B", "labels": ["production"]}
    },
    "PUT /api/prompts/{name}/labels/{label}": lambda w: {"json": {"version": 1}},
    "POST /api/prompts/{name}/labels/{label}/rollback": lambda w: {"json": {"to_version": 1}},
    "DELETE /api/prompts/{name}/labels/{label}": lambda w: {},
    "PUT /api/prompts/{name}/protected": lambda w: {"json": {"labels": ["production"]}},
    "POST /api/prompts/{name}/render": lambda w: {"json": {"variables": {}}},
    "POST /api/datasets": lambda w: {"json": {"name": f"b-dataset-{w.run}", "items": [{"input": "b"}]}},
    "DELETE /api/datasets/{ref}": lambda w: {},
    "POST /api/datasets/{ref}/items": lambda w: {"json": {"items": [{"input": "b"}], "replace": True}},
    "DELETE /api/datasets/{ref}/items/{item_id}": lambda w: {},
    "POST /api/datasets/{ref}/import": lambda w: {
        "content": b'{"input": "b"}\n',
        "params": {"create": "false"},
    },
    "POST /api/datasets/{ref}/items/from-traces": lambda w: {
        "json": {"trace_ids": [w.a["trace_id"]], "create": False}
    },
    "POST /api/evals/runs": lambda w: {"json": {"suite": "b", "dataset": w.a["dataset_id"]}},
    "POST /api/evals/runs/{run_id}/results": lambda w: {
        "json": {"results": [{"variant": "v", "item_id": w.a["dataset_item_id"], "output": "b"}]}
    },
    "POST /api/evals/runs/{run_id}/finish": lambda w: {"json": {"status": "failed"}},
    "POST /api/evals/runs/{run_id}/gate": lambda w: {"json": {"baseline": w.a["run_id"]}},
    "DELETE /api/evals/runs/{run_id}": lambda w: {},
    "POST /api/annotation-queues": lambda w: {
        "json": {"name": "b-q", "score_name": "q", "project": w.a["project"]}
    },
    "DELETE /api/annotation-queues/{queue_id}": lambda w: {},
    "POST /api/annotation-queues/{queue_id}/items": lambda w: {"json": {"trace_ids": [w.a["trace_id"]]}},
    "POST /api/annotation-queues/{queue_id}/dataset": lambda w: {"json": {"dataset": "b-from-a"}},
    "POST /api/annotation-items/{item_id}/review": lambda w: {"json": {"value": 1}},
    "POST /api/online-rules": lambda w: {
        "json": {"name": "b-rule", "sample_rate": 1.0, "queue_id": w.a["queue_id"], "project": w.a["project"]}
    },
    "PUT /api/online-rules/{rule_id}": lambda w: {"json": {"name": "b-rule", "sample_rate": 0.0}},
    "DELETE /api/online-rules/{rule_id}": lambda w: {},
    "POST /api/accounts": lambda w: {"json": {"name": f"b-acct-{w.run}", "password": "pw-0123456789"}},
    "PATCH /api/accounts/{account_id}": lambda w: {"json": {"disabled": True}},
    "DELETE /api/accounts/{account_id}": lambda w: {},
    "PUT /api/projects/{project}/members/{account_id}": lambda w: {"json": {"role": "viewer"}},
    "DELETE /api/projects/{project}/members/{account_id}": lambda w: {},
    # the gateway and OTLP write only under the caller's project: checked in test_writes_naming_a_do_not_reach_a
    "POST /v1/chat/completions": lambda w: {"skip": "own project"},
    "POST /chat/completions": lambda w: {"skip": "own project"},
    "POST /v1/embeddings": lambda w: {"skip": "own project"},
    "POST /embeddings": lambda w: {"skip": "own project"},
    "POST /v1/messages": lambda w: {"skip": "own project"},
    "POST /v1/traces": lambda w: {"skip": "own project"},
    # UI forms: the B user's session
    "POST /login": lambda w: {"skip": "sign-in"},
    "POST /logout": lambda w: {"skip": "sign-out"},
    "POST /account/project": lambda w: {"ui": True, "data": {"project": w.a["project_id"]}},
    "POST /prompts/{name}/labels": lambda w: {"ui": True, "data": {"label": "production", "version": "1"}},
    "POST /prompts/{name}/rollback": lambda w: {"ui": True, "data": {"label": "production"}},
    "POST /prompts/{name}/playground": lambda w: {"ui": True, "data": {"version": "1"}},
    "POST /evals/datasets/add-trace": lambda w: {
        "ui": True,
        "data": {"trace_id": w.a["trace_id"], "dataset": w.a["dataset"]},
    },
    "POST /review": lambda w: {"ui": True, "data": {"name": "b-ui-queue", "score_name": "q"}},
    "POST /review/{queue_id}/items": lambda w: {"ui": True, "data": {"trace_ids": w.a["trace_id"]}},
    "POST /review/{queue_id}/dataset": lambda w: {"ui": True, "data": {"dataset": "b-from-a"}},
    "POST /review/{queue_id}/items/{item_id}": lambda w: {"ui": True, "data": {"value": "1"}},
}


def _fill(w: World, method: str, path: str) -> tuple[str, list[str]]:
    """The path with A's values; fails on a parameter the table does not know."""
    used: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1).split(":", 1)[0]
        if name not in PARAMS:
            pytest.fail(f"{method} {path}: path parameter {{{name}}} is not in test_isolation.PARAMS: add it")
        value = PARAMS[name](w, path)
        used.append(value)
        return value

    return re.sub(r"\{([^}]+)\}", sub, path), used


def _leaks(w: World, body: str, echoed: list[str]) -> list[str]:
    return sorted(m for m in w.markers() if m in body and not any(m in e for e in echoed))


# -- building project A ------------------------------------------------------------------------------


def _ok(r: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert r.status_code in (status, 200, 201), (
        f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    )
    out: dict[str, Any] = r.json()
    return out


def _build(keel: Keel) -> World:
    w = World(run=uuid.uuid4().hex[:8])
    m = keel.http
    a, b = f"iso-a-{w.run}", f"iso-b-{w.run}"
    ka = _ok(m.post("/api/keys", json={"project": a, "name": "a-admin", "scopes": ADMIN}), 201)
    w.a_key = ka["key"]
    w.a.update(project=a, project_id=ka["project_id"])
    kb = _ok(m.post("/api/keys", json={"project": b, "name": "b-admin", "scopes": ADMIN}), 201)
    w.b_key = kb["key"]
    w.b_project_id = kb["project_id"]
    w.b_public = _ok(m.post("/api/keys", json={"project": b, "kind": "public"}), 201)["key"]
    ha = {"authorization": f"Bearer {w.a_key}"}
    w.a["key_id"] = _ok(m.post("/api/keys", json={"project": a, "name": f"a-plain-{w.run}"}), 201)["id"]
    w.a["team"] = f"a-team-{w.run}"
    _ok(m.post("/api/teams", json={"project": a, "name": w.a["team"]}, headers=ha), 201)
    # a trace through the gateway, with A's end user, session and a secret in the prompt
    w.a.update(end_user=f"alice-{w.run}", session=f"sess-a-{w.run}", secret=f"a-secret-{w.run}")
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key=w.a_key, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"remember {w.a['secret']}"}],
        user=w.a["end_user"],
        extra_headers={"x-keel-session-id": w.a["session"], "x-keel-tags": f"a-tag-{w.run}"},
    )
    w.a["trace_id"] = raw.headers["x-keel-trace-id"]
    keel.wait_for_trace(w.a["trace_id"])
    w.a["score_id"] = _ok(
        m.post(
            "/api/scores",
            json={"trace_id": w.a["trace_id"], "name": f"a-score-{w.run}", "value": 1},
            headers=ha,
        ),
        201,
    )["id"]
    w.a["prompt"] = f"a-prompt-{w.run}"
    _ok(
        m.post(
            "/api/prompts",
            json={
                "name": w.a["prompt"],
                "type": "text",
                "template": f"A {w.a['secret']}",
                "labels": ["production"],
            },
            headers=ha,
        ),
        201,
    )
    w.a["dataset"] = f"a-dataset-{w.run}"
    ds = _ok(
        m.post(
            "/api/datasets", json={"name": w.a["dataset"], "items": [{"input": w.a["secret"]}]}, headers=ha
        ),
        201,
    )
    w.a["dataset_id"] = ds["id"]
    items = _ok(m.get(f"/api/datasets/{ds['id']}/items", headers=ha))["data"]
    w.a["dataset_item_id"] = items[0]["id"]
    run = _ok(
        m.post("/api/evals/runs", json={"suite": f"a-suite-{w.run}", "dataset": ds["id"]}, headers=ha), 201
    )
    w.a["run_id"] = run["id"]
    q = _ok(
        m.post(
            "/api/annotation-queues", json={"name": f"a-queue-{w.run}", "score_name": "quality"}, headers=ha
        ),
        201,
    )
    w.a["queue_id"] = q["id"]
    _ok(
        m.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": [w.a["trace_id"]]}, headers=ha),
        201,
    )
    w.a["item_index"] = str(_ok(m.get(f"/api/annotation-queues/{q['id']}/items", headers=ha))[0]["id"])
    rule = _ok(
        m.post("/api/online-rules", json={"name": f"a-rule-{w.run}", "sample_rate": 0.0}, headers=ha), 201
    )
    w.a["rule_id"] = rule["id"]
    acct = _ok(
        m.post(
            "/api/accounts",
            json={
                "name": f"a-user-{w.run}",
                "password": "pw-a-0123456789",
                "memberships": [{"project": a, "role": "admin"}],
            },
        ),
        201,
    )
    w.a["account_id"] = acct["id"]
    w.a["account"] = acct["name"]
    # a B admin user with a UI session
    _ok(
        m.post(
            "/api/accounts",
            json={
                "name": f"b-user-{w.run}",
                "password": "pw-b-0123456789",
                "memberships": [{"project": b, "role": "admin"}],
            },
        ),
        201,
    )
    with httpx.Client(base_url=keel.url, follow_redirects=False) as c:
        r = c.post("/login", data={"username": f"b-user-{w.run}", "password": "pw-b-0123456789"})
        assert r.status_code == 303, r.text
        w.b_cookies = {"keel_session": c.cookies["keel_session"]}
    return w


def _snapshot(keel: Keel, w: World) -> dict[str, Any]:
    """Everything of A that a B write could change, as A's own admin key sees it."""
    h = {"authorization": f"Bearer {w.a_key}"}
    m = keel.http

    def get(path: str) -> Any:
        r = m.get(path, headers=h)
        return r.status_code, r.json() if r.headers.get("content-type", "").startswith(
            "application/json"
        ) else r.text

    trace = get(f"/api/traces/{w.a['trace_id']}")
    return {
        "trace": (
            trace[0],
            {k: v for k, v in trace[1].items() if k != "scores"} if trace[0] == 200 else None,
        ),
        "scores": get(f"/api/scores?trace_id={w.a['trace_id']}"),
        "keys": get("/api/keys"),
        "teams": get("/api/teams"),
        "prompt": get(f"/api/prompts/{w.a['prompt']}"),
        "dataset": get(f"/api/datasets/{w.a['dataset_id']}"),
        "items": get(f"/api/datasets/{w.a['dataset_id']}/items"),
        "run": get(f"/api/evals/runs/{w.a['run_id']}"),
        "queue": get(f"/api/annotation-queues/{w.a['queue_id']}"),
        "queue_items": get(f"/api/annotation-queues/{w.a['queue_id']}/items"),
        "rule": get(f"/api/online-rules/{w.a['rule_id']}"),
        "retention": get("/api/retention"),
        "account": get(f"/api/accounts/{w.a['account_id']}"),
        "members": get(f"/api/projects/{w.a['project_id']}/members"),
        "projects": m.get("/api/projects").json(),
    }


@pytest.fixture(scope="module")
def world(keel: Keel) -> Iterator[World]:
    yield _build(keel)


# -- the tests -----------------------------------------------------------------------------------------


def test_every_route_is_covered(keel: Keel, world: World) -> None:
    """Each route's parameters and each write route are in the tables (a new route fails here first)."""
    missing = []
    for method, path in _route_list(keel.app):
        _fill(world, method, path)
        if method in WRITE_METHODS and f"{method} {path}" not in WRITES:
            missing.append(f"{method} {path}")
    assert not missing, "write routes without an entry in test_isolation.WRITES:\n" + "\n".join(missing)
    assert any(p.startswith("/api/") for _, p in _route_list(keel.app))


def test_reads_with_b_key_see_nothing_of_a(keel: Keel, world: World) -> None:
    h = {"authorization": f"Bearer {world.b_key}"}
    problems = []
    checked = 0
    for method, path in _route_list(keel.app):
        if method != "GET" or path in PUBLIC or path.startswith("/static"):
            continue
        url, used = _fill(world, method, path)
        r = keel.http.get(url, headers=h)
        checked += 1
        if r.status_code in (401, 403, 404, 303):
            continue
        if r.status_code >= 400 and r.status_code != 400:
            problems.append(f"GET {url}: {r.status_code} {r.text[:200]}")
            continue
        leaked = _leaks(world, r.text, used)
        if leaked:
            problems.append(f"GET {url} ({r.status_code}) shows A's {leaked}")
    assert checked > 40
    assert not problems, "\n".join(problems)


def test_ui_pages_with_b_user_session_see_nothing_of_a(keel: Keel, world: World) -> None:
    problems = []
    with httpx.Client(base_url=keel.url, cookies=world.b_cookies, follow_redirects=False, timeout=30) as c:
        assert "b-user" in c.get("/traces").text  # the session works
        for method, path in _route_list(keel.app):
            if method != "GET" or path.startswith(("/api", "/v1", "/static")) or path in PUBLIC:
                continue
            if path in ("/chat/completions", "/embeddings", "/metrics", "/openapi.json"):
                continue
            url, used = _fill(world, method, path)
            r = c.get(url)
            if r.status_code in (303, 403, 404):
                continue
            leaked = _leaks(world, r.text, used)
            if r.status_code >= 500 or leaked:
                problems.append(f"GET {url} ({r.status_code}) shows A's {leaked}")
    assert not problems, "\n".join(problems)


def test_writes_with_b_key_on_a_are_refused_and_a_is_unchanged(keel: Keel, world: World) -> None:
    before = _snapshot(keel, world)
    h = {"authorization": f"Bearer {world.b_key}"}
    problems = []
    for method, path in _route_list(keel.app):
        if method not in WRITE_METHODS:
            continue
        spec = WRITES[f"{method} {path}"](world)
        if "skip" in spec:
            continue
        url, used = _fill(world, method, path)
        if spec.get("ui"):
            with httpx.Client(base_url=keel.url, cookies=world.b_cookies, follow_redirects=False) as c:
                r = c.request(method, url, data=spec["data"])
            # a page answers a refused form with 403/404, or a redirect back carrying the error
            if r.status_code not in (303, 403, 404) or _leaks(world, r.text, used):
                problems.append(f"UI {method} {url}: {r.status_code} {r.text[:200]}")
            continue
        headers = dict(h)
        if path == "/api/public/feedback":
            headers = {"authorization": f"Bearer {world.b_public}"}
        kwargs = {k: v for k, v in spec.items() if k in ("json", "content", "params")}
        r = keel.http.request(method, url, headers=headers, **kwargs)
        refused = r.status_code in (403, 404) or (r.status_code == 400 and "not found" in r.text)
        if not refused and not (
            # writes without an A id in the path create B's own things: fine when nothing of A shows
            not used and r.status_code < 300 and not _leaks(world, r.text, [json.dumps(spec)])
        ):
            problems.append(f"{method} {url} {json.dumps(spec)[:120]}: {r.status_code} {r.text[:200]}")
    after = _snapshot(keel, world)
    changed = [k for k in before if before[k] != after[k]]
    assert not problems, "\n".join(problems)
    assert not changed, f"B's writes changed A's {changed}"


def test_writes_naming_a_do_not_reach_a(keel: Keel, world: World) -> None:
    """The gateway and OTLP ingest with A's trace id in a traceparent / span: B's spans stay out of A."""
    before = _snapshot(keel, world)
    tid = world.a["trace_id"]
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key=world.b_key, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "b joins"}],
        extra_headers={"traceparent": f"00-{tid}-{'1' * 16}-01"},
    )
    assert raw.headers["x-keel-trace-id"]
    span = {
        "traceId": tid,
        "spanId": "2" * 16,
        "name": "b-span",
        "startTimeUnixNano": str(time.time_ns()),
        "endTimeUnixNano": str(time.time_ns()),
    }
    r = httpx.post(
        keel.url + "/v1/traces",
        json={"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]},
        headers={"authorization": f"Bearer {world.b_key}"},
        timeout=30,
    )
    assert r.status_code in (200, 403, 404), r.text
    # the writer is one FIFO queue: once a later trace of B is stored, the spans above are written too
    later = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "after"}]
    )
    keel.wait_for_trace(later.headers["x-keel-trace-id"])
    after = _snapshot(keel, world)
    assert after["trace"] == before["trace"], "B's spans joined A's trace"
    # nothing B sent was lost: its spans live in a trace of B's own, found under the id B was given
    own = keel.http.get(f"/api/traces/{tid}", headers={"authorization": f"Bearer {world.b_key}"})
    assert own.status_code == 200, own.text
    assert own.json()["trace_id"] != tid and own.json()["project_id"] == world.b_project_id
    names = {s["name"] for s in own.json()["spans"]}
    assert "b-span" in names and len(own.json()["spans"]) >= 2
    assert all(s["attributes"].get("keel.rehomed_from") == tid for s in own.json()["spans"])
    # and B sees no A trace through its own trace list
    mine = keel.http.get("/api/traces", headers={"authorization": f"Bearer {world.b_key}"}).json()["data"]
    assert all(world.a["secret"] not in json.dumps(t) for t in mine)


def test_a_key_without_admin_scope_cannot_manage_its_own_project(keel: Keel, world: World) -> None:
    """The default scopes (gateway, ingest, read) read but do not administer."""
    plain = keel.http.post("/api/keys", json={"project": world.a["project"], "name": "plain"}).json()
    assert plain["scopes"] == ["gateway", "ingest", "read"]
    h = {"authorization": f"Bearer {plain['key']}"}
    assert keel.http.get("/api/traces", headers=h).status_code == 200
    for method, path, body in (
        ("POST", "/api/keys", {"project": world.a["project"]}),
        ("DELETE", f"/api/keys/{world.a['key_id']}", None),
        ("POST", "/api/prompts", {"name": "x", "type": "text", "template": "x"}),
        ("POST", "/api/datasets", {"name": "x"}),
        ("PUT", f"/api/projects/{world.a['project_id']}/members/{world.a['account_id']}", {"role": "viewer"}),
        ("PATCH", f"/api/projects/{world.a['project_id']}", {"retention_days": 1}),
    ):
        r = keel.http.request(method, path, json=body, headers=h)
        assert r.status_code == 403, f"{method} {path}: {r.status_code} {r.text}"
