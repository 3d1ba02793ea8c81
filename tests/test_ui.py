"""The web UI, end to end: real requests through the gateway (official openai SDK), then headless chromium.

Runs against both backends (the ``keel`` fixture). Screenshots of the trace list and of a trace page
are written to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Page

from keel.ui.views import build_span_tree, fmt_cost, fmt_ms, input_messages, output_messages
from tests.conftest import UI_TIMEOUT_MS

pytestmark = [pytest.mark.ui, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}


# -- fixtures -----------------------------------------------------------------------------------


@dataclass
class Seed:
    """Traces created through the gateway for this module (one set per backend)."""

    run: str
    user: str
    chat: str
    chat_reply: str
    stream: str
    stream_reply: str
    tool: str
    claude: str
    error: str
    traces: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ids(self) -> set[str]:
        return {self.chat, self.stream, self.tool, self.claude, self.error}


def sdk(keel: Any, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=keel.url + "/v1", api_key=key or keel.master_key, max_retries=0, timeout=30)


def trace_id_of(raw: Any) -> str:
    tid = raw.headers.get("x-keel-trace-id")
    assert tid, "gateway response without x-keel-trace-id"
    return str(tid)


@pytest.fixture(scope="module")
def seed(keel: Any) -> Seed:
    run = uuid.uuid4().hex[:8]
    user = f"ui-{run}"
    client = sdk(keel)
    completions = client.chat.completions

    raw = completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": f"Hello from the keel UI test {run}"},
        ],
        user=user,
        temperature=0.2,
        max_tokens=64,
        extra_headers={"x-keel-tags": f"ui-test,run-{run}", "x-keel-session-id": f"sess-{run}"},
    )
    chat, chat_reply = trace_id_of(raw), raw.parse().choices[0].message.content
    assert chat_reply

    raw_stream = completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"Stream me a short poem {run}"}],
        user=user,
        stream=True,
        stream_options={"include_usage": True},
    )
    stream = trace_id_of(raw_stream)
    stream_reply = "".join(ch.choices[0].delta.content or "" for ch in raw_stream.parse() if ch.choices)
    assert stream_reply

    raw = completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Please use the tool to get the weather in Paris"}],
        tools=[WEATHER_TOOL],
        user=user,
    )
    tool = trace_id_of(raw)
    calls = raw.parse().choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"

    raw = completions.with_raw_response.create(
        model="claude-haiku",
        messages=[{"role": "user", "content": f"Hi Claude {run}"}],
        user=user,
        max_tokens=50,
    )
    claude = trace_id_of(raw)

    with pytest.raises(openai.APIStatusError) as info:
        completions.create(
            model="fault-500", messages=[{"role": "user", "content": "this one fails"}], user=user
        )
    assert info.value.status_code == 502
    error = str(info.value.response.headers["x-keel-trace-id"])

    s = Seed(run, user, chat, chat_reply, stream, stream_reply, tool, claude, error)
    for tid in s.ids:
        s.traces[tid] = keel.wait_for_trace(tid)
    return s


# -- helpers ------------------------------------------------------------------------------------


def login(page: Page, keel: Any, key: str) -> None:
    page.goto(keel.url + "/login")
    page.fill("#key", key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(r"/traces(\?.*)?$"))


def row_ids(page: Page) -> list[str]:
    ids: list[str] = page.locator("tr[data-testid=trace-row]").evaluate_all(
        "els => els.map(e => e.dataset.traceId)"
    )
    return ids


def shot(page: Page, name: str, keel: Any) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}-{keel.backend}.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def wait_spans(keel: Any, trace_id: str, n: int, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        t = keel.wait_for_trace(trace_id)
        if len(t["spans"]) >= n:
            return t
        assert time.monotonic() < deadline, f"trace {trace_id} has {len(t['spans'])} spans, wanted {n}"
        time.sleep(0.05)


# -- plain HTTP: redirects, cookies, headers ----------------------------------------------------


def test_http_auth_flow_and_headers(keel: Any) -> None:
    with httpx.Client(base_url=keel.url, timeout=15, follow_redirects=False) as c:
        r = c.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = c.get("/traces")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = c.get("/traces/0123abcd")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Ftraces%2F0123abcd"

        r = c.get("/login")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"

        r = c.post("/login", data={"key": "sk-keel-not-a-real-key"})
        assert r.status_code == 401 and "not accepted" in r.text and "set-cookie" not in r.headers
        r = c.post("/login", data={"key": ""})
        assert r.status_code == 401 and "Paste an API key" in r.text
        # a cross-site form post is refused (login CSRF), even with a good key
        r = c.post("/login", data={"key": keel.master_key}, headers={"origin": "https://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers

        # an open redirect through ?next= is refused
        r = c.post("/login", data={"key": keel.master_key, "next": "//evil.example/x"})
        assert r.status_code == 303 and r.headers["location"] == "/traces"
        cookie = r.headers["set-cookie"].lower()
        assert cookie.startswith("keel_key=") and "httponly" in cookie and "samesite=strict" in cookie
        r = c.post("/login", data={"key": keel.master_key, "next": "/traces?status=error"})
        assert r.headers["location"] == "/traces?status=error"

        c.cookies.set("keel_key", keel.master_key)
        assert c.get("/").headers["location"] == "/traces"
        r = c.get("/traces")
        assert r.status_code == 200 and "Master key" in r.text
        r = c.get("/logout")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert 'keel_key=""' in r.headers["set-cookie"] or "max-age=0" in r.headers["set-cookie"].lower()

        css = c.get("/static/keel.css")
        assert css.status_code == 200 and "text/css" in css.headers["content-type"] and ".topbar" in css.text
        js = c.get("/static/keel.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]

    paths = keel.http.get("/openapi.json").json()["paths"]
    assert not any(p in paths for p in ("/", "/login", "/logout", "/traces", "/traces/{trace_id}"))


# -- browser ------------------------------------------------------------------------------------


def test_login_rejects_bad_key_then_accepts_master(page: Page, keel: Any) -> None:
    page.goto(keel.url + "/traces")
    page.wait_for_url(re.compile(r"/login$"))
    page.fill("#key", "sk-keel-definitely-wrong")
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as resp:
        page.click("form.auth-form button[type=submit]")
    assert resp.value.status == 401
    err = page.get_by_test_id("login-error")
    err.wait_for()
    assert "not accepted" in err.inner_text()
    assert page.context.cookies() == []

    page.fill("#key", keel.master_key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(r"/traces$"))
    assert page.get_by_test_id("who").inner_text() == "Master key"
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "keel_key" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # the HttpOnly cookie is invisible to scripts
    assert "keel_key" not in page.evaluate("document.cookie")


def test_trace_list_shows_traces_and_filters(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, keel.master_key)
    visible = set(row_ids(page))
    assert seed.ids <= visible or len(visible) == 50  # the newest page (other suites may add traces)

    # filter by user with the text field; empty fields are dropped from the shareable URL
    page.fill("[data-testid=filter-user]", seed.user)
    page.click("[data-testid=apply-filters]")
    page.wait_for_url(re.compile(r"user=ui-"))
    assert "tag=" not in page.url and "start=" not in page.url
    assert set(row_ids(page)) == seed.ids
    # newest first
    starts = [seed.traces[t]["start_time"] for t in row_ids(page)]
    assert starts == sorted(starts, reverse=True)

    chat_row = page.locator(f"tr[data-trace-id='{seed.chat}']")
    text = chat_row.inner_text()
    tr = seed.traces[seed.chat]
    assert "OK" in text and "gpt-4o-mini" in text and seed.user in text and "ui-test" in text
    assert f"{tr['input_tokens']} → {tr['output_tokens']}" in text
    assert fmt_cost(tr["cost_usd"]) in text and fmt_cost(tr["cost_usd"]).startswith("$0.0")
    assert chat_row.locator("time").get_attribute("title", timeout=UI_TIMEOUT_MS)
    err_row = page.locator(f"tr[data-trace-id='{seed.error}']").inner_text()
    assert "Error" in err_row and "upstream" in err_row.lower()
    shot(page, "ui-traces", keel)

    # the model select applies at once (no Apply click) and narrows the list
    claude_model = seed.traces[seed.claude]["model"]
    options = page.locator("[data-testid=filter-model] option").evaluate_all("os => os.map(o => o.value)")
    assert claude_model in options and "gpt-4o-mini" in options
    page.select_option("[data-testid=filter-model]", claude_model)
    page.wait_for_url(re.compile(r"model="))
    assert row_ids(page) == [seed.claude]
    page.select_option("[data-testid=filter-model]", "gpt-4o-mini")
    page.wait_for_url(re.compile(r"model=gpt-4o-mini"))
    assert set(row_ids(page)) == {seed.chat, seed.stream, seed.tool}

    page.select_option("[data-testid=filter-model]", "")
    page.wait_for_url(lambda url: "model=" not in url)
    page.select_option("[data-testid=filter-status]", "error")
    page.wait_for_url(re.compile(r"status=error"))
    assert row_ids(page) == [seed.error]
    page.select_option("[data-testid=filter-status]", "ok")
    page.wait_for_url(re.compile(r"status=ok"))
    assert set(row_ids(page)) == seed.ids - {seed.error}

    # URLs are shareable: tag and time filters straight from the address bar
    page.goto(f"{keel.url}/traces?tag=run-{seed.run}")
    assert row_ids(page) == [seed.chat]
    page.goto(f"{keel.url}/traces?user={seed.user}&range=1h")
    assert set(row_ids(page)) == seed.ids
    assert "active" in (page.get_by_test_id("range-1h").get_attribute("class") or "")
    page.goto(f"{keel.url}/traces?user={seed.user}&end=2001-01-01T00:00")
    page.get_by_test_id("empty-filtered").wait_for()
    assert row_ids(page) == []
    page.goto(f"{keel.url}/traces?user={seed.user}&start=2001-01-01T00:00")
    assert set(row_ids(page)) == seed.ids
    page.goto(f"{keel.url}/traces?user={seed.user}&start=not-a-time")
    assert "not a valid time" in page.locator(".alert-warn").inner_text()
    assert set(row_ids(page)) == seed.ids


def test_pagination(page: Page, keel: Any) -> None:
    user = f"pager-{uuid.uuid4().hex[:8]}"
    client = sdk(keel)
    made = []
    for i in range(5):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"page {i}"}], user=user
        )
        made.append(trace_id_of(raw))
    for tid in made:
        keel.wait_for_trace(tid)

    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces?user={user}&limit=2")
    seen: list[str] = []
    pages = 0
    while True:
        ids = row_ids(page)
        assert 1 <= len(ids) <= 2
        seen += ids
        pages += 1
        older = page.get_by_test_id("older")
        if older.count() == 0:
            break
        assert page.get_by_test_id("page-info").inner_text().startswith("2 traces")
        older.click()
        page.wait_for_url(re.compile(r"cursor="))
        assert "limit=2" in page.url and f"user={user}" in page.url
        assert page.get_by_test_id("newest").count() == 1
    assert pages == 3
    assert sorted(seen) == sorted(made) and len(set(seen)) == 5  # every trace once, none twice
    page.get_by_test_id("newest").click()
    page.wait_for_url(lambda url: "cursor=" not in url)
    assert row_ids(page) == seen[:2]
    page.goto(f"{keel.url}/traces?user={user}&cursor=garbage")
    assert "no longer valid" in page.locator(".alert-warn").inner_text()
    assert row_ids(page) == seen


def test_chat_trace_page(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces?user={seed.user}")
    # clicking anywhere on the row (not only on the id link) opens the trace
    page.locator(f"tr[data-trace-id='{seed.chat}'] td").nth(5).click()
    page.wait_for_url(re.compile(rf"/traces/{seed.chat}$"))

    t = seed.traces[seed.chat]
    span = t["spans"][0]
    assert page.get_by_test_id("trace-id").inner_text() == seed.chat
    assert page.locator(".trace-head [data-testid=status]").inner_text().strip() == "OK"
    assert page.get_by_test_id("span-row").count() == 1
    stats = page.get_by_test_id("trace-stats").inner_text()
    assert "gpt-4o-mini" in stats and "openai" in stats and seed.user in stats and f"sess-{seed.run}" in stats
    assert "ui-test" in stats and f"run-{seed.run}" in stats
    tokens = page.get_by_test_id("trace-tokens").inner_text()
    assert str(t["total_tokens"]) in tokens and f"{t['input_tokens']} in" in tokens
    cost = page.get_by_test_id("trace-cost").inner_text().strip()
    assert cost == fmt_cost(t["cost_usd"]) and re.fullmatch(r"\$0\.0\d+", cost)

    detail = page.locator(f"[data-span-panel='{span['span_id']}']")
    assert detail.is_visible()
    inp = detail.get_by_test_id("input-messages").inner_text()
    assert f"Hello from the keel UI test {seed.run}" in inp and "You are a terse assistant." in inp
    assert "system" in inp.lower() and "user" in inp.lower()
    out = detail.get_by_test_id("output-messages").inner_text()
    assert seed.chat_reply in out and "stop" in out
    assert (
        detail.get_by_test_id("span-tokens").inner_text()
        == f"{span['input_tokens']} in · {span['output_tokens']} out"
    )
    assert detail.get_by_test_id("span-cost").inner_text().strip() == cost
    params = detail.locator(".block", has_text="Parameters").inner_text()
    assert "temperature" in params and "0.2" in params and "max_tokens" in params and "64" in params
    assert "keel.deployment" in detail.locator(".block", has_text="Attributes").inner_text()

    shot(page, "ui-trace", keel)

    raw_in = detail.get_by_test_id("raw-input")
    assert not raw_in.locator("pre").is_visible()
    raw_in.locator("summary").click()
    assert '"temperature": 0.2' in raw_in.locator("pre").inner_text()
    detail.get_by_test_id("raw-output").locator("summary").click()
    assert '"chat.completion"' in detail.get_by_test_id("raw-output").locator("pre").inner_text()


def test_streamed_trace_page(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces/{seed.stream}")
    out = page.get_by_test_id("output-messages").inner_text()
    assert seed.stream_reply in out
    assert f"Stream me a short poem {seed.run}" in page.get_by_test_id("input-messages").inner_text()
    assert page.get_by_test_id("trace-ttft").inner_text().endswith(("ms", "µs", " s"))
    assert "keel.stream" in page.locator(".block", has_text="Attributes").inner_text()
    t = seed.traces[seed.stream]
    assert page.get_by_test_id("trace-cost").inner_text().strip() == fmt_cost(t["cost_usd"])


def test_tool_call_trace_page(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces/{seed.tool}")
    out = page.get_by_test_id("output-messages")
    assert out.locator(".toolcall-name").inner_text() == "get_weather"
    args = out.locator(".toolcall pre").inner_text()
    assert '"city"' in args and '"unit"' in args and "\n" in args  # pretty-printed arguments
    assert "tool_calls" in out.inner_text()  # the finish reason
    tools = page.get_by_test_id("tools")
    assert "get_weather" in tools.inner_text() and "Current weather for a city" in tools.inner_text()
    assert "weather in Paris" in page.get_by_test_id("input-messages").inner_text()


def test_error_trace_page(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces?user={seed.user}&status=error")
    page.locator(f"tr[data-trace-id='{seed.error}'] a.id-link").click()
    page.wait_for_url(re.compile(rf"/traces/{seed.error}$"))
    banner = page.get_by_test_id("trace-error")
    assert banner.is_visible()
    assert "500" in banner.inner_text() and seed.traces[seed.error]["error"] in banner.inner_text()
    assert page.locator(".trace-head [data-testid=status]").inner_text().strip() == "Error"
    # the root span is selected; its retried attempts are children in the span tree
    span_err = page.get_by_test_id("span-error").first.inner_text()
    assert "HTTP 502" in span_err and "upstream" in span_err.lower()
    assert page.get_by_test_id("span-error").count() == 3
    tree = page.get_by_test_id("span-tree").inner_text()
    assert "attempt 1" in tree and "attempt 2" in tree
    assert "this one fails" in page.get_by_test_id("input-messages").inner_text()
    assert "the call failed" in page.locator(".block", has_text="Output").first.inner_text()
    assert page.get_by_test_id("trace-cost").inner_text().strip() == "—"


def test_multi_span_trace_and_span_selection(page: Page, keel: Any) -> None:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    client = sdk(keel)
    for word in ("first", "second"):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"the {word} call"}],
            extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        )
    t = wait_spans(keel, trace_id, 2)
    first, second = sorted(t["spans"], key=lambda s: s["start_time"])

    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces/{trace_id}")
    rows = page.get_by_test_id("span-row")
    assert rows.count() == 2
    assert page.locator("svg.wf rect.wf-bar").count() == 2
    p1 = page.locator(f"[data-span-panel='{first['span_id']}']")
    p2 = page.locator(f"[data-span-panel='{second['span_id']}']")
    assert p1.is_visible() and not p2.is_visible()
    rows.nth(1).click()
    page.wait_for_url(re.compile(rf"span={second['span_id']}"))
    assert p2.is_visible() and not p1.is_visible()
    assert "the second call" in p2.get_by_test_id("input-messages").inner_text()
    assert rows.nth(1).get_attribute("aria-current") == "true"
    # the selected span survives a reload (server-side selection)
    page.reload()
    assert page.locator(f"[data-span-panel='{second['span_id']}']").is_visible()
    assert not page.locator(f"[data-span-panel='{first['span_id']}']").is_visible()


def test_bodies_are_escaped(page: Page, keel: Any) -> None:
    evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    raw = sdk(keel).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": evil}], user="<b>bold-user</b>"
    )
    tid = trace_id_of(raw)
    keel.wait_for_trace(tid)
    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces?user=<b>bold-user</b>")
    assert row_ids(page) == [tid]
    assert "<b>bold-user</b>" in page.locator(f"tr[data-trace-id='{tid}']").inner_text()
    page.goto(f"{keel.url}/traces/{tid}")
    assert evil in page.get_by_test_id("input-messages").inner_text()
    assert page.locator(".msg-text img, .msg-text script").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_virtual_key_sees_only_its_project(page: Page, keel: Any, seed: Seed) -> None:
    run = uuid.uuid4().hex[:8]
    key_a = keel.create_key(project=f"ui-a-{run}", name="team-a-key")
    key_b = keel.create_key(project=f"ui-b-{run}", name="team-b-key")
    raw = sdk(keel, key_a["key"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "from project A"}]
    )
    trace_a = trace_id_of(raw)
    raw = sdk(keel, key_b["key"]).chat.completions.with_raw_response.create(
        model="claude-haiku", messages=[{"role": "user", "content": "from project B"}], max_tokens=20
    )
    trace_b = trace_id_of(raw)
    keel.wait_for_trace(trace_a)
    keel.wait_for_trace(trace_b)

    login(page, keel, key_a["key"])
    assert page.get_by_test_id("who").inner_text() == "team-a-key"
    assert f"ui-a-{run}" in page.locator(".who-detail").inner_text()
    assert row_ids(page) == [trace_a]
    options = page.locator("[data-testid=filter-model] option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["", seed.traces[seed.chat]["model"]]  # only project A's models
    assert page.locator("select[name=project]").count() == 0
    # a project filter in the URL cannot widen a virtual key's view
    page.goto(f"{keel.url}/traces?project={key_b['project_id']}")
    assert row_ids(page) == [trace_a]

    resp = page.goto(f"{keel.url}/traces/{trace_b}")
    assert resp is not None and resp.status == 404
    page.get_by_test_id("not-found").wait_for()
    assert "from project B" not in page.content()
    resp = page.goto(f"{keel.url}/traces/{seed.chat}")
    assert resp is not None and resp.status == 404
    resp = page.goto(f"{keel.url}/traces/{trace_a}")
    assert resp is not None and resp.status == 200
    assert "from project A" in page.get_by_test_id("input-messages").inner_text()

    # the master key sees both, and may narrow by project
    page.get_by_test_id("logout").click()
    page.wait_for_url(re.compile(r"/login$"))
    login(page, keel, keel.master_key)
    page.goto(f"{keel.url}/traces?project={key_b['project_id']}")
    assert row_ids(page) == [trace_b]
    assert page.locator("select[name=project] option:checked").inner_text() == f"ui-b-{run}"


def test_logout_and_revocation(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, keel.master_key)
    page.get_by_test_id("logout").click()
    page.wait_for_url(re.compile(r"/login$"))
    assert page.context.cookies() == []
    page.goto(f"{keel.url}/traces")
    page.wait_for_url(re.compile(r"/login$"))

    # a deep link survives the detour through the login page
    page.goto(f"{keel.url}/traces/{seed.chat}")
    page.wait_for_url(re.compile(r"/login\?next="))
    page.fill("#key", keel.master_key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(rf"/traces/{seed.chat}$"))
    page.get_by_test_id("logout").click()
    page.wait_for_url(re.compile(r"/login$"))

    # a revoked key is logged out at its next request
    key = keel.create_key(project=f"ui-rev-{seed.run}", name="short-lived")
    login(page, keel, key["key"])
    assert page.get_by_test_id("who").inner_text() == "short-lived"
    r = keel.http.delete(f"/api/keys/{key['id']}")
    assert r.status_code == 200
    page.reload()
    page.wait_for_url(re.compile(r"/login$"))
    assert page.context.cookies() == []
    page.fill("#key", key["key"])
    page.click("form.auth-form button[type=submit]")
    assert "not accepted" in page.get_by_test_id("login-error").inner_text()


# -- the view helpers, without a browser --------------------------------------------------------


def test_formatting_helpers() -> None:
    assert fmt_cost(0.000123) == "$0.000123"
    assert fmt_cost(3.3e-06) == "$0.0000033"
    assert fmt_cost(0.0123) == "$0.0123"
    assert fmt_cost(12.3456) == "$12.35"
    assert fmt_cost(0.0) == "$0"
    assert fmt_cost(None) == "unpriced" and fmt_cost(None, has_usage=False) == "—"
    assert fmt_ms(0.5) == "500 µs" and fmt_ms(12.34) == "12.3 ms" and fmt_ms(1240) == "1.24 s"


def test_span_tree_nests_and_scales() -> None:
    t0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)

    def span(sid: str, parent: str | None, start_ms: int, dur_ms: int) -> dict[str, Any]:
        def iso(ms: int) -> str:
            return (t0 + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")

        return {
            "span_id": sid,
            "parent_span_id": parent,
            "start_time": iso(start_ms),
            "end_time": iso(start_ms + dur_ms),
            "latency_ms": dur_ms,
        }

    spans = [
        span("c2", "root", 600, 400),
        span("root", "gone", 0, 1000),
        span("c1", "root", 0, 500),
        span("g", "c1", 100, 100),
    ]
    nodes = build_span_tree(spans)
    assert [(n.span["span_id"], n.depth) for n in nodes] == [("root", 0), ("c1", 1), ("g", 2), ("c2", 1)]
    by_id = {n.span["span_id"]: n for n in nodes}
    assert by_id["root"].width_pct == 100 and by_id["root"].has_children
    assert by_id["c2"].offset_pct == 60 and by_id["c2"].width_pct == 40
    assert by_id["g"].offset_pct == 10 and not by_id["g"].has_children


def test_message_views() -> None:
    msgs = input_messages(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "one"},
                        {"type": "image_url", "image_url": {"url": "data:x"}},
                        {"type": "text", "text": "two"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ]
        }
    )
    assert msgs is not None
    assert msgs[0].text == "one\ntwo" and msgs[0].notes == ["image: inline data"]
    assert msgs[1].tool_calls[0].name == "f" and msgs[1].tool_calls[0].arguments == '{\n  "a": 1\n}'
    assert msgs[2].notes == ["result of c1"] and msgs[2].text == "42"
    streamed = output_messages({"role": "assistant", "content": "hi", "finish_reason": "stop"})
    assert streamed is not None and streamed[0].text == "hi" and streamed[0].finish_reason == "stop"
    full = output_messages(
        {
            "object": "chat.completion",
            "choices": [{"message": {"role": "assistant", "content": "yo"}, "finish_reason": "length"}],
        }
    )
    assert full is not None and full[0].text == "yo" and full[0].finish_reason == "length"
    assert input_messages({"question": "not chat"}) is None and output_messages("text") is None
