"""Rate limits, budgets, per-run caps and soft-limit alerts enforced by the gateway, on both backends."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import BACKENDS, Keel, free_port, make_keel


class Receiver:
    """A local webhook receiver (a real HTTP server) collecting JSON posts."""

    def __init__(self) -> None:
        self.posts: list[Any] = []
        posts = self.posts

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                posts.append(orjson.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", free_port()), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module", params=BACKENDS)
def gov(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mock_upstream: Any,
    receiver: Receiver,
) -> Iterator[Keel]:
    server, app = make_keel(
        request.param, tmp_path_factory.mktemp("gov"), mock_upstream, request, alert_webhook_url=receiver.url
    )
    k = Keel(server, app, request.param)
    yield k
    k.http.close()
    server.stop()


def call(k: Keel, key: str, model: str = "cheap", **headers: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
    return httpx.post(
        k.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=30,
    )


def test_rpm_limit_per_key(gov: Keel) -> None:
    key = gov.http.post(
        "/api/keys", json={"project": "rl-" + uuid.uuid4().hex[:6], "limits": {"rpm": 3}}
    ).json()["key"]
    codes = [call(gov, key).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = call(gov, key)
    assert r.json()["error"]["code"] == "rate_limit_exceeded:key:rpm" and int(r.headers["retry-after"]) >= 1
    trace = gov.wait_for_trace(r.headers["x-keel-trace-id"])
    assert trace["status"] == "error" and trace["spans"][0]["status_code"] == 429


def test_team_limit_is_shared_by_its_keys(gov: Keel) -> None:
    project = "team-rl-" + uuid.uuid4().hex[:6]
    gov.http.post("/api/teams", json={"project": project, "name": "t", "limits": {"rpm": 4}})
    a = gov.http.post("/api/keys", json={"project": project, "team": "t"}).json()["key"]
    b = gov.http.post("/api/keys", json={"project": project, "team": "t"}).json()["key"]
    codes = [call(gov, k).status_code for k in (a, b, a, b, a, b)]
    assert codes.count(200) == 4 and codes[-2:] == [429, 429]
    assert call(gov, b).json()["error"]["code"] == "rate_limit_exceeded:team:rpm"


def test_budget_hard_and_soft_limits(gov: Keel, receiver: Receiver) -> None:
    # "cheap" costs $1/$2 per MTok: a call here is ~3e-5 USD at most (prompt + max_tokens 20)
    created = gov.http.post(
        "/api/keys",
        json={
            "project": "budget-" + uuid.uuid4().hex[:6],
            "limits": {"budget_usd": 0.0003, "soft_budget_usd": 0.00005, "budget_period": "daily"},
        },
    ).json()
    codes = []
    for _ in range(60):
        r = call(gov, created["key"])
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "budget_exceeded"
            break
        time.sleep(0.02)  # settlement is asynchronous
    assert codes[-1] == 429 and codes.count(200) >= 5
    deadline = time.monotonic() + 10
    scope = f"key:{created['id']}"
    while not any(p["scope"] == scope for p in receiver.posts) and time.monotonic() < deadline:
        time.sleep(0.05)
    alerts = [p for p in receiver.posts if p["scope"] == scope]
    assert len(alerts) == 1 and alerts[0]["type"] == "budget.soft_limit_crossed"
    assert alerts[0]["status"]["spent"] >= 0.00005
    # the spend that was let through never exceeded the hard limit
    assert alerts[0]["status"]["limit"] == pytest.approx(0.0003)


def test_run_call_cap_stops_a_runaway_agent(gov: Keel) -> None:
    project = "agents-" + uuid.uuid4().hex[:6]
    gov.http.post("/api/projects", json={"name": project, "limits": {"run_max_calls": 3}})
    key = gov.http.post("/api/keys", json={"project": project}).json()["key"]
    run = "run-" + uuid.uuid4().hex[:6]
    codes = [call(gov, key, **{"x-keel-run-id": run}).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert call(gov, key, **{"x-keel-run-id": "another-run"}).status_code == 200
    assert call(gov, key).status_code == 200  # requests outside a run are not capped
