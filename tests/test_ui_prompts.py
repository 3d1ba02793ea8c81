"""Prompt pages in headless chromium: list, history, label moves and rollback, diff, playground run."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.ui, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def login(page: Page, keel: Any, key: str, then: str) -> None:
    page.goto(keel.url + "/login?next=" + then)
    page.fill("#key", key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(re.escape(then) + "$"))


def seed(keel: Any) -> str:
    name = f"ui-{uuid.uuid4().hex[:6]}"
    for marker, labels in (("V1", ["production"]), ("V2", [])):
        r = keel.http.post(
            "/api/prompts",
            json={
                "name": name,
                "type": "chat",
                "messages": [
                    {"role": "system", "content": f"{marker} system for {{{{ product }}}}."},
                    {"role": "user", "content": marker + ": {{ question }}"},
                ],
                "variables": {"product": {"type": "string", "default": "keel"}, "question": "string"},
                "config": {"model": "gpt-4o-mini", "temperature": 0.2 if marker == "V1" else 0.5},
                "metadata": {"owner": "ui-team"},
                "commit_message": f"{marker} message",
                "labels": labels,
            },
        )
        assert r.status_code == 201, r.text
    return name


def test_list_history_label_moves_and_rollback(page: Page, keel: Any) -> None:
    name = seed(keel)
    login(page, keel, keel.master_key, "/prompts")
    row = page.locator(f"tr[data-testid=prompt-row][data-name='{name}']")
    expect(row).to_contain_text("v2")
    expect(row).to_contain_text("production → v1")
    expect(row).to_contain_text("ui-team")
    row.locator("a").click()
    page.wait_for_url(re.compile(f"/prompts/{name}$"))

    expect(page.locator("tr[data-testid=version-row]")).to_have_count(2)
    expect(page.locator("[data-testid=version-template]")).to_contain_text("V2 system for {{ product }}.")
    target = page.locator("tr[data-testid=label-row][data-label=production] [data-testid=label-target]")
    expect(target).to_have_text("v1")

    page.select_option("[data-testid=move-label-version]", "2")
    page.click("[data-testid=move-label-submit]")
    expect(page.locator("[data-testid=notice]")).to_contain_text("production now points at version 2")
    expect(target).to_have_text("v2")
    expect(page.locator("tr[data-testid=label-row][data-label=production]")).to_contain_text("master")
    assert keel.http.get(f"/api/prompts/{name}/versions/production").json()["version"] == 2

    page.click("[data-testid=rollback-production]")
    expect(page.locator("[data-testid=notice]")).to_contain_text("rolled back to version 1")
    expect(target).to_have_text("v1")

    page.select_option("[data-testid=move-label-version]", "1")
    page.select_option("[data-testid=move-label-canary]", "2")
    page.fill("[data-testid=move-label-weight]", "10")
    page.click("[data-testid=move-label-submit]")
    expect(target).to_have_text("v1 (90%), v2 (10%)")
    history = page.locator("tr[data-testid=history-row]")
    expect(history.first).to_contain_text("label")
    expect(history.nth(1)).to_contain_text("rollback")
    expect(history).to_have_count(6)  # create, label, version, label, rollback, label

    page.fill("[data-testid=move-label-name]", "Not A Label")
    page.click("[data-testid=move-label-submit]")
    expect(page.locator("[data-testid=error]")).to_contain_text("is invalid")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"prompt-{keel.backend}.png"), full_page=True)


def test_side_by_side_diff(page: Page, keel: Any) -> None:
    name = seed(keel)
    login(page, keel, keel.master_key, f"/prompts/{name}")
    page.click("[data-testid=open-diff]")
    page.wait_for_url(re.compile(f"/prompts/{name}/diff$"))
    changed = page.locator("[data-testid=diff-template] tr[data-kind=replace]")
    expect(changed.first).to_contain_text("V1 system for {{ product }}.")
    expect(changed.first).to_contain_text("V2 system for {{ product }}.")
    expect(page.locator("[data-testid=diff-config] tr[data-kind=replace]")).to_contain_text(
        '"temperature": 0.5'
    )
    page.select_option("[data-testid=diff-from]", "2")
    page.click("[data-testid=diff-submit]")
    expect(page.locator("[data-testid=diff-template] tr[data-kind=replace]")).to_have_count(0)


def test_playground_runs_a_version_through_the_gateway(page: Page, keel: Any) -> None:
    name = seed(keel)
    login(page, keel, keel.master_key, f"/prompts/{name}/playground")
    page.select_option("[data-testid=pg-version]", "1")
    page.select_option("[data-testid=pg-model]", "cheap")
    page.fill("[data-testid=pg-var-question]", "what is keel?")
    page.click("[data-testid=pg-run]")
    expect(page.locator("[data-testid=pg-output]")).to_have_text("Mock reply to: V1: what is keel?")
    expect(page.locator("[data-testid=pg-tokens]")).to_contain_text("→")
    expect(page.locator("[data-testid=pg-cost]")).to_contain_text("$")
    expect(page.locator("[data-testid=pg-latency]")).to_contain_text("ms")
    href = page.locator("[data-testid=pg-trace]").get_attribute("href")
    assert href
    t = keel.wait_for_trace(href.rsplit("/", 1)[1])
    assert (t["prompt_name"], t["prompt_version"], t["model"]) == (name, 1, "cheap")
    assert "playground" in t["tags"]

    page.fill("[data-testid=pg-var-question]", "")
    page.click("[data-testid=pg-run]")
    expect(page.locator("[data-testid=pg-error]")).to_contain_text("missing variable 'question'")


def test_virtual_key_reads_without_write_controls(page: Page, keel: Any) -> None:
    name = seed(keel)
    key = keel.create_key(project="default")["key"]  # the master's prompts are in the default project
    login(page, keel, key, f"/prompts/{name}")
    expect(page.locator("[data-testid=versions-table]")).to_be_visible()
    expect(page.locator("[data-testid=move-label]")).to_have_count(0)
    with httpx.Client(base_url=keel.url, cookies={"keel_key": key}, follow_redirects=False) as c:
        r = c.post(f"/prompts/{name}/labels", data={"label": "production", "version": "2"})
        assert r.status_code == 303 and "master%20key" in r.headers["location"]
        r = c.post(
            f"/prompts/{name}/labels",
            data={"label": "production", "version": "2"},
            headers={"origin": "https://evil.example"},
        )
        assert r.status_code == 403
    assert keel.http.get(f"/api/prompts/{name}/versions/production").json()["version"] == 1
    with httpx.Client(base_url=keel.url, follow_redirects=False) as c:
        assert c.get("/prompts").status_code == 303
    page.goto(keel.url + "/prompts/does-not-exist")
    expect(page.locator("[data-testid=prompt-missing]")).to_be_visible()
