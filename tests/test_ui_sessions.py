"""Sessions, users and the explorer's search and filters in the web UI, in headless chromium.

Traffic goes through the gateway with the official openai SDK (``user`` and ``x-keel-session-id``);
runs against both backends (the ``keel`` fixture). Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.sync_api import Page

pytestmark = [pytest.mark.ui, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@dataclass
class Seed:
    run: str
    project_id: str
    key: str
    other_key: str
    user: str
    session: str
    other_session: str
    turns: list[tuple[str, str, str]] = field(default_factory=list)  # (trace id, sent, reply)
    lone: str = ""  # a trace with no session


@pytest.fixture(scope="module")
def seed(keel: Any) -> Seed:
    run = uuid.uuid4().hex[:8]
    created = keel.create_key(project=f"uis-{run}", name="ui-sessions")
    other = keel.create_key(project=f"uis-other-{run}", name="ui-sessions-other")
    s = Seed(
        run=run,
        project_id=created["project_id"],
        key=created["key"],
        other_key=other["key"],
        user=f"carol-{run}",
        session=f"talk-{run}",
        other_session=f"talk-other-{run}",
    )
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key=s.key, max_retries=0, timeout=30)
    history: list[dict[str, str]] = []
    for text in (f"Tell me about zeppelins {run}", f"And their hydrogen {run}"):
        history.append({"role": "user", "content": text})
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=history, user=s.user, extra_headers={"x-keel-session-id": s.session}
        )
        reply = raw.parse().choices[0].message.content or ""
        history.append({"role": "assistant", "content": reply})
        s.turns.append((raw.headers["x-keel-trace-id"], text, reply))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"quokka sightings {run}"}], user=s.user
    )
    s.lone = raw.headers["x-keel-trace-id"]
    raw = openai.OpenAI(
        base_url=keel.url + "/v1", api_key=s.other_key, max_retries=0, timeout=30
    ).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"elsewhere {run}"}],
        user=f"dave-{run}",
        extra_headers={"x-keel-session-id": s.other_session},
    )
    for tid in [t for t, _, _ in s.turns] + [s.lone, raw.headers["x-keel-trace-id"]]:
        keel.wait_for_trace(tid)
    return s


def login(page: Page, keel: Any, key: str) -> None:
    page.goto(keel.url + "/login")
    page.fill("#key", key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(r"/traces(\?.*)?$"))


def shot(page: Page, name: str, keel: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}-{keel.backend}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


def test_sessions_list_to_conversation_to_trace(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, seed.key)
    page.click("[data-testid=nav-sessions]")
    page.wait_for_url(re.compile(r"/sessions$"))
    rows = page.locator("tr[data-testid=session-row]")
    # a virtual key sees its own project's one session, not the other project's
    assert rows.evaluate_all("els => els.map(e => e.dataset.sessionId)") == [seed.session]
    row = rows.first
    assert row.locator("[data-testid=cell-traces]").inner_text() == "2"
    assert seed.user in row.inner_text()
    shot(page, "ui-sessions", keel)

    row.locator("td").first.click()  # the whole row is a link
    page.wait_for_url(re.compile(r"/sessions/talk-"))
    assert page.get_by_test_id("session-id").inner_text() == seed.session
    assert page.get_by_test_id("session-trace-count").inner_text() == "2"
    turns = page.locator("[data-testid=turn]")
    assert turns.evaluate_all("els => els.map(e => e.dataset.traceId)") == [t for t, _, _ in seed.turns]
    for i, (_, sent, reply) in enumerate(seed.turns):
        assert turns.nth(i).get_by_test_id("turn-input").inner_text() == sent
        assert turns.nth(i).get_by_test_id("turn-output").inner_text() == reply
    shot(page, "ui-session", keel)

    turns.nth(1).get_by_test_id("turn-link").click()
    page.wait_for_url(re.compile(rf"/traces/{seed.turns[1][0]}$"))
    # the trace page links back to its session and user
    page.get_by_test_id("trace-session").click()
    page.wait_for_url(re.compile(r"/sessions/talk-"))
    page.get_by_test_id("session-user").click()
    page.wait_for_url(re.compile(r"/users/carol-"))
    assert page.get_by_test_id("user-id").inner_text() == seed.user


def test_users_list_and_user_page(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, keel.master_key)
    page.goto(keel.url + f"/users?project={seed.project_id}")
    rows = page.locator("tr[data-testid=user-row]")
    assert rows.evaluate_all("els => els.map(e => e.dataset.user)") == [seed.user]
    assert rows.first.locator("[data-testid=cell-traces]").inner_text() == "3"
    assert rows.first.locator("[data-testid=cell-sessions]").inner_text() == "1"
    shot(page, "ui-users", keel)
    rows.first.locator("a").click()
    page.wait_for_url(re.compile(r"/users/carol-"))
    assert page.get_by_test_id("user-trace-count").inner_text() == "3"
    assert page.get_by_test_id("user-session-count").inner_text() == "1"
    assert "gpt-4o-mini" in page.get_by_test_id("user-models").inner_text()
    sessions = page.locator("tr[data-testid=user-session-row]")
    assert sessions.evaluate_all("els => els.map(e => e.dataset.sessionId)") == [seed.session]
    traces = page.locator("[data-testid=user-traces] tr[data-testid=trace-row]")
    assert traces.evaluate_all("els => els.map(e => e.dataset.traceId)")[0] == seed.lone
    assert traces.count() == 3
    shot(page, "ui-user", keel)

    # another project's virtual key does not see this user or session
    page.context.clear_cookies()
    login(page, keel, seed.other_key)
    resp = page.goto(keel.url + f"/users/{seed.user}")
    assert resp is not None and resp.status == 404
    resp = page.goto(keel.url + f"/sessions/{seed.session}")
    assert resp is not None and resp.status == 404
    assert "Session not found" in page.get_by_test_id("not-found").inner_text()


def test_trace_search_box_and_more_filters(page: Page, keel: Any, seed: Seed) -> None:
    login(page, keel, seed.key)
    page.fill("[data-testid=filter-q]", "quokka")
    page.click("[data-testid=apply-filters]")
    page.wait_for_url(re.compile(r"q=quokka"))
    ids = page.locator("tr[data-testid=trace-row]").evaluate_all("els => els.map(e => e.dataset.traceId)")
    assert ids == [seed.lone]
    # every word must match; only a turn's last user message (and its reply) is indexed, not the history
    page.fill("[data-testid=filter-q]", f"zeppelins {seed.run}")
    page.click("[data-testid=apply-filters]")
    page.wait_for_url(re.compile(r"q=zeppelins"))
    ids = page.locator("tr[data-testid=trace-row]").evaluate_all("els => els.map(e => e.dataset.traceId)")
    assert ids == [seed.turns[0][0]]
    page.fill("[data-testid=filter-q]", f"hydrog* {seed.run}")
    page.click("[data-testid=apply-filters]")
    page.wait_for_url(re.compile(r"q=hydrog"))
    ids = page.locator("tr[data-testid=trace-row]").evaluate_all("els => els.map(e => e.dataset.traceId)")
    assert ids == [seed.turns[1][0]]
    shot(page, "ui-traces-search", keel)

    # the further filters sit in a collapsed section; a session filter narrows to the conversation
    page.goto(keel.url + "/traces")
    more = page.get_by_test_id("more-filters")
    assert more.get_attribute("open") is None
    more.locator("summary").click()
    page.fill("[data-testid=filter-session]", seed.session)
    page.fill("[data-testid=filter-min-latency]", "0")
    page.click("[data-testid=apply-filters]")
    page.wait_for_url(re.compile(r"session=talk-"))
    assert page.get_by_test_id("more-filters").get_attribute("open") is not None
    ids = page.locator("tr[data-testid=trace-row]").evaluate_all("els => els.map(e => e.dataset.traceId)")
    assert set(ids) == {t for t, _, _ in seed.turns}
    assert page.locator("[data-testid=cell-session]").first.inner_text().startswith("talk-")
    # a latency floor above every trace empties the list; a bad number is dropped with a notice
    page.goto(keel.url + f"/traces?session={seed.session}&min_latency_ms=99999999")
    assert page.get_by_test_id("empty-filtered").is_visible()
    page.goto(keel.url + f"/traces?session={seed.session}&max_cost_usd=cheap")
    assert "not a valid number" in page.locator(".alert-warn").inner_text()
    assert page.locator("tr[data-testid=trace-row]").count() == 2
    page.goto(keel.url + "/traces?q=%21%21%21")
    assert "no words" in page.locator(".alert-warn").inner_text()
