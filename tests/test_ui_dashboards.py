"""The dashboards page in headless chromium: the numbers are the API's, charts draw, breakdowns switch.

Runs against both backends (the ``keel`` fixture). Traffic goes through the gateway (official
openai SDK) with a key of a fresh project, so the page and /api/metrics see exactly that traffic.
A screenshot is written to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.sync_api import Page

pytestmark = [pytest.mark.ui, pytest.mark.timeout(240)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@dataclass
class Traffic:
    project: str
    key: str
    run: str


@pytest.fixture(scope="module")
def traffic(keel: Any) -> Traffic:
    run = uuid.uuid4().hex[:8]
    project = f"dash-ui-{run}"
    key = keel.create_key(project=project)["key"]
    client = openai.OpenAI(base_url=keel.url + "/v1", api_key=key, max_retries=0, timeout=30)
    for k in range(4):
        client.chat.completions.create(
            model="gpt-4o-mini" if k % 2 == 0 else "cheap",
            messages=[{"role": "user", "content": f"hello {k}"}],
            user=f"alice-{run}" if k < 3 else f"bob-{run}",
            extra_headers={"x-keel-tags": f"dash-{run}", "x-keel-session-id": f"sess-{run}"},
        )
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="fault-500", messages=[{"role": "user", "content": "fail"}])
    auth = {"authorization": f"Bearer {key}"}
    deadline = time.monotonic() + 20
    while keel.http.get("/api/metrics/summary", headers=auth).json()["totals"]["requests"] < 5:
        assert time.monotonic() < deadline, "traces not written"
        time.sleep(0.1)
    return Traffic(project, key, run)


def login(page: Page, keel: Any, key: str) -> None:
    page.goto(keel.url + "/login")
    page.fill("#key", key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(r"/traces(\?.*)?$"))


def test_dashboard_shows_the_api_numbers(page: Page, keel: Any, traffic: Traffic) -> None:
    login(page, keel, traffic.key)
    page.click("[data-testid=nav-dashboards]")
    page.wait_for_url(re.compile(r"/dashboards$"))
    api = keel.http.get(
        "/api/metrics/summary",
        headers={"authorization": f"Bearer {traffic.key}"},
        params={"group_by": "model"},
    ).json()
    totals = api["totals"]
    assert totals["requests"] == 5 and totals["errors"] == 1
    kpi = page.get_by_test_id("kpi-requests")
    assert kpi.get_attribute("data-value") == "5" and kpi.inner_text() == "5"
    assert page.get_by_test_id("kpi-errors").get_attribute("data-value") == "1"
    assert page.get_by_test_id("kpi-error-rate").inner_text().startswith("20%")
    assert page.get_by_test_id("kpi-tokens").get_attribute("data-value") == str(totals["total_tokens"])
    assert float(page.get_by_test_id("kpi-cost").get_attribute("data-value") or "nan") == pytest.approx(
        totals["cost_usd"]
    )
    assert page.get_by_test_id("kpi-p95").inner_text() not in ("", "—")

    # six charts, each with a drawn line (requests in the last 24 h)
    for chart in ("requests", "error-rate", "latency", "tokens", "cost"):
        assert page.get_by_test_id(f"chart-{chart}").locator("[data-testid=chart-line]").count() >= 1, chart
    assert page.get_by_test_id("chart-ttft").count() == 1

    # breakdown by model (the default): the API's groups, busiest first
    rows = page.locator("tr[data-testid=dash-group-row]")
    groups = rows.evaluate_all(
        "els => els.map(e => [e.dataset.group, e.querySelector('[data-testid=group-requests]').textContent])"
    )
    assert groups == [[g["group"], str(g["requests"])] for g in api["groups"]]
    assert {g for g, _ in groups} == {"gpt-4o-mini", "cheap", "fault-500"}
    assert page.get_by_test_id("dash-group-charts").locator("[data-testid=chart-line]").count() >= 3

    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboards-{keel.backend}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000

    # a model's name links to its traces
    page.locator("tr[data-group=cheap] a").click()
    page.wait_for_url(re.compile(r"/traces\?model=cheap$"))
    assert page.locator("tr[data-testid=trace-row]").count() == 2


@pytest.mark.parametrize(
    ("by", "want"),
    [("user", {"alice": "3", "bob": "1"}), ("tag", {"dash": "4", "": "1"}), ("session", {"sess": "4"})],
)
def test_breakdowns_switch(page: Page, keel: Any, traffic: Traffic, by: str, want: dict[str, str]) -> None:
    login(page, keel, traffic.key)
    page.goto(keel.url + "/dashboards?range=7d")
    page.get_by_test_id(f"dash-by-{by}").click()
    page.wait_for_url(re.compile(rf"by={by}"))
    assert "active" in (page.get_by_test_id("dash-range-7d").get_attribute("class") or "")
    rows = page.locator("tr[data-testid=dash-group-row]").evaluate_all(
        "els => els.map(e => [e.dataset.group, e.querySelector('[data-testid=group-requests]').textContent])"
    )
    got = {g.split("-")[0] if g else "": n for g, n in rows}
    assert got == want


def test_master_key_picks_a_project_and_bad_params_are_notices(
    page: Page, keel: Any, traffic: Traffic
) -> None:
    login(page, keel, keel.master_key)
    page.goto(keel.url + "/dashboards?range=forever&by=planet")
    notices = page.locator(".alert-warn").all_inner_texts()
    assert any("forever" in n for n in notices) and any("planet" in n for n in notices)
    page.get_by_test_id("dash-project").select_option(label=traffic.project)
    page.wait_for_url(re.compile(r"project="))
    assert page.get_by_test_id("kpi-requests").get_attribute("data-value") == "5"
    page.get_by_test_id("dash-by-prompt_version").click()
    page.wait_for_url(re.compile(r"by=prompt_version"))
    rows = page.locator("tr[data-testid=dash-group-row]")
    assert rows.count() == 1 and rows.first.get_attribute("data-group") == ""  # no prompts used


def test_signed_out_goes_to_login(page: Page, keel: Any) -> None:
    page.goto(keel.url + "/dashboards")
    page.wait_for_url(re.compile(r"/login\?next=%2Fdashboards$"))
