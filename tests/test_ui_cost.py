"""The cost page in headless chromium: totals, the spend chart, breakdowns and budgets match the API."""

from __future__ import annotations

import time
import uuid
from typing import Any

import openai
import pytest
from playwright.sync_api import Page

from keel.ui.views import fmt_cost
from tests.test_ui import login, shot

pytestmark = [pytest.mark.ui, pytest.mark.timeout(180)]


def _spend(keel: Any, key: str, model: str, user: str, n: int) -> None:
    c = openai.OpenAI(base_url=keel.url + "/v1", api_key=key, max_retries=0, timeout=30)
    for i in range(n):
        c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"cost page {i}"}], max_tokens=20, user=user
        )


def _usage(keel: Any, key: str, group_by: str) -> dict[str, Any]:
    r = keel.http.get("/api/usage", params={"group_by": group_by}, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_cost_page_shows_what_the_api_counts(page: Page, keel: Any) -> None:
    project = "costui-" + uuid.uuid4().hex[:6]
    assert keel.http.post("/api/teams", json={"project": project, "name": "search"}).status_code == 201
    created = keel.http.post(
        "/api/keys",
        json={
            "project": project,
            "team": "search",
            "name": "checkout",
            "limits": {"budget_usd": 2.5, "soft_budget_usd": 2.0, "budget_period": "monthly"},
        },
    ).json()
    key = created["key"]
    _spend(keel, key, "cheap", "alice", 3)
    _spend(keel, key, "gpt-4o-mini", "bob", 2)
    deadline = time.monotonic() + 15
    while _usage(keel, key, "model")["totals"]["requests"] < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    usage = _usage(keel, key, "model")
    assert usage["totals"]["requests"] == 5

    login(page, keel, key)
    page.click("[data-testid=nav-cost]")
    page.wait_for_url("**/cost")
    assert page.locator("[data-testid=cost-total]").inner_text() == fmt_cost(usage["totals"]["cost_usd"])
    # the 7-day chart has a bar per day, today's carries the spend
    bars = page.locator("[data-testid=cost-bar]")
    assert bars.count() in (7, 8)
    heights = bars.evaluate_all("els => els.map(e => parseFloat(e.getAttribute('height')))")
    assert max(heights) > 0 and heights[-1] == max(heights)

    table = page.locator("[data-testid=cost-breakdown]")
    assert {"cheap", "gpt-4o-mini"} <= set(table.locator("tbody td:first-child").all_inner_texts())
    by_model = {r["group"]: r for r in usage["data"]}
    for model in ("cheap", "gpt-4o-mini"):
        row = table.locator("tbody tr", has_text=model)
        assert fmt_cost(by_model[model]["cost_usd"]) in row.inner_text()

    page.click("[data-testid=cost-by-user]")
    page.wait_for_url("**by=user**")
    users = set(page.locator("[data-testid=cost-breakdown] tbody td:first-child").all_inner_texts())
    assert users == {"alice", "bob"}
    page.click("[data-testid=cost-by-team]")
    assert page.locator("[data-testid=cost-breakdown] tbody td:first-child").all_inner_texts() == ["search"]
    # a virtual key never gets the project breakdown or other projects
    assert page.locator("[data-testid=cost-by-project]").count() == 0

    # the budget row reads the gateway's ledger: limit minus what was spent (settled in the background)
    budget = page.locator("[data-testid=budgets] tbody tr", has_text="checkout")
    assert "$2.50" in budget.inner_text() and "alert at $2.00" in budget.inner_text()
    # the ledger counts whole micro-dollars per call: equal to the traced cost within that rounding
    spent = float(budget.locator("[data-testid=budget-spent]").inner_text().lstrip("$"))
    assert spent > 0 and spent == pytest.approx(usage["totals"]["cost_usd"], abs=5 * 1e-6)
    remaining = float(budget.locator("[data-testid=budget-remaining]").inner_text().lstrip("$"))
    assert remaining == pytest.approx(2.5 - spent, abs=0.005)
    shot(page, "cost", keel)

    page.click("[data-testid=cost-range-24h]")
    assert page.locator("[data-testid=cost-bar]").count() in (24, 25)


def test_master_sees_every_project_and_can_narrow(page: Page, keel: Any) -> None:
    project = "costm-" + uuid.uuid4().hex[:6]
    key = keel.create_key(project=project)["key"]
    _spend(keel, key, "cheap", "carol", 1)
    pid = keel.store.get_project(project)["id"]
    deadline = time.monotonic() + 15
    while (
        not any(r["group"] == pid for r in _usage(keel, keel.master_key, "project")["data"])
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    login(page, keel, keel.master_key)
    page.goto(keel.url + "/cost?by=project")
    rows = page.locator("[data-testid=cost-breakdown] tbody td:first-child").all_inner_texts()
    assert project in rows
    page.select_option("[data-testid=cost-project]", pid)
    page.wait_for_url(f"**project={pid}**")
    assert page.locator("[data-testid=cost-breakdown] tbody td:first-child").all_inner_texts() == [project]
    own = _usage(keel, key, "model")["totals"]["cost_usd"]
    assert page.locator("[data-testid=cost-total]").inner_text() == fmt_cost(own)


def test_cost_page_needs_login(keel: Any) -> None:
    import httpx

    r = httpx.get(keel.url + "/cost", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
