"""Eval pages in headless chromium (both backends): runs, a run, compare with CIs and per-item diff,
datasets with versions and export, and "Add to dataset" from a trace page.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from keel.evals import EvalClient, execute_suite, parse_suite
from tests.conftest import Keel

pytestmark = [pytest.mark.ui, pytest.mark.timeout(240)]


def login(page: Page, keel: Keel) -> None:
    page.goto(keel.url + "/login")
    page.fill("#key", keel.master_key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(r"/traces(\?.*)?$"))


def _run(keel: Keel, dataset: str, template: str, label: str) -> dict[str, Any]:
    suite = parse_suite(
        {
            "name": f"ui-suite-{keel.backend}",
            "dataset": dataset,
            "prompts": [{"name": "p", "messages": [{"role": "user", "content": template}]}],
            "models": ["gpt-4o-mini"],
            "scorers": ["exact", "levenshtein"],
            "cache": False,
        }
    )

    async def go() -> dict[str, Any]:
        async with EvalClient(keel.url, keel.master_key) as client:
            return (await execute_suite(suite, client, label=label)).run

    # playwright's sync API keeps an event loop running in this thread: run the suite in another
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


@pytest.fixture(scope="module")
def runs(keel: Keel) -> tuple[dict[str, Any], dict[str, Any], str]:
    name = f"ui-ds-{uuid.uuid4().hex[:6]}"
    items = [
        {"id": f"item{i}", "input": {"q": f"ui question {i}"}, "expected": f"Mock reply to: ui question {i}"}
        for i in range(6)
    ]
    assert keel.http.post("/api/datasets", json={"name": name, "items": items}).status_code == 201
    base = _run(keel, name, "{{ q }}", "ui-base")
    head = _run(
        keel, name, "{% if q.endswith('1') or q.endswith('2') %}Changed: {% endif %}{{ q }}", "ui-head"
    )
    return base, head, name


def test_runs_list_run_page_and_compare(
    keel: Keel, page: Page, runs: tuple[dict[str, Any], dict[str, Any], str]
) -> None:
    base, head, _ = runs
    login(page, keel)
    page.click("[data-testid=nav-evals]")
    page.wait_for_url(re.compile(r"/evals$"))
    rows = page.locator("tr[data-testid=run-row]")
    expect(rows.first).to_have_attribute("data-run", head["id"])
    page.locator(f"tr[data-run={head['id']}] [data-testid=run-link]").click()
    page.wait_for_url(re.compile(rf"/evals/runs/{head['id']}$"))
    expect(page.locator("[data-testid=variant-row]")).to_have_count(1)
    expect(page.locator("[data-testid=result-row]")).to_have_count(6)
    expect(page.locator("[data-testid=run-cost]")).to_contain_text("$0.0000")
    # compare with the baseline chosen in the page's selector
    page.select_option("[data-testid=baseline-select]", base["id"])
    page.click("[data-testid=compare-with]")
    page.wait_for_url(re.compile(r"/evals/compare\?"))
    exact = page.locator("tr[data-testid=delta-row][data-scorer=exact]")
    expect(exact.locator("[data-testid=delta]")).to_have_text("-0.333")
    expect(exact.locator("[data-testid=ci]")).to_contain_text("[-")
    expect(page.locator("[data-testid=gate-verdict]")).to_have_text("gate fails")
    # the per-item diff: the two changed items first, with both outputs side by side
    first = page.locator("tr[data-testid=diff-row]").first
    expect(first).to_have_attribute("data-item", re.compile(r"item[12]"))
    expect(first.locator(".diff-left")).to_contain_text("Mock reply to: ui question")
    expect(first.locator(".diff-right")).to_contain_text("Mock reply to: Changed: ui question")
    page.click("[data-testid=toggle-changed]")
    expect(page.locator("tr[data-testid=diff-row]")).to_have_count(2)
    page.screenshot(path="test-artifacts/evals-compare.png", full_page=True)


def test_compare_from_the_runs_list(
    keel: Keel, page: Page, runs: tuple[dict[str, Any], dict[str, Any], str]
) -> None:
    base, head, _ = runs
    login(page, keel)
    page.goto(keel.url + "/evals")
    page.locator(f"tr[data-run={base['id']}] [data-testid=pick-base]").check()
    page.locator(f"tr[data-run={head['id']}] [data-testid=pick-head]").check()
    page.click("[data-testid=compare-go]")
    page.wait_for_url(re.compile(r"/evals/compare\?"))
    expect(page.locator("tr[data-testid=delta-row]")).to_have_count(2)


def test_add_a_trace_to_a_dataset_from_the_trace_page(
    keel: Keel, page: Page, runs: tuple[dict[str, Any], dict[str, Any], str]
) -> None:
    r = keel.http.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "keep me for evals"}]},
    )
    tid = r.headers["x-keel-trace-id"]
    keel.wait_for_trace(tid)
    name = f"from-ui-{uuid.uuid4().hex[:6]}"
    login(page, keel)
    page.goto(f"{keel.url}/traces/{tid}")
    page.fill("[data-testid=add-dataset-name]", name)
    page.click("[data-testid=add-to-dataset-go]")
    page.wait_for_url(re.compile(r"/evals/datasets/ds_"))
    expect(page.locator("[data-testid=notice]")).to_contain_text("added (version 1)")
    row = page.locator("tr[data-testid=item-row]")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("keep me for evals")
    expect(row).to_contain_text("Mock reply to: keep me for evals")
    # the API sees the same dataset
    items = keel.http.get(f"/api/datasets/{name}/items").json()["data"]
    assert items[0]["source_trace_id"] == tid
    # a second add is a no-op: still version 1
    page.goto(f"{keel.url}/traces/{tid}")
    page.fill("[data-testid=add-dataset-name]", name)
    page.click("[data-testid=add-to-dataset-go]")
    expect(page.locator("[data-testid=notice]")).to_contain_text("already in the dataset (version 1)")


def test_dataset_page_versions_and_export(
    keel: Keel, page: Page, runs: tuple[dict[str, Any], dict[str, Any], str]
) -> None:
    _, _, name = runs
    keel.http.delete(f"/api/datasets/{name}/items/item0")
    login(page, keel)
    page.goto(keel.url + "/evals")
    page.locator("tr[data-testid=dataset-row]", has_text=name).locator("a").click()
    expect(page.locator("[data-testid=dataset-version]")).to_have_text("v2")
    expect(page.locator("tr[data-testid=item-row]")).to_have_count(5)
    page.select_option("#ds-version", "1")
    page.click("form[action*='/evals/datasets/'] button")
    expect(page.locator("tr[data-testid=item-row]")).to_have_count(6)
    with page.expect_download() as dl:
        page.click("[data-testid=export-csv]")
    text = open(dl.value.path()).read()
    assert text.startswith("id,q,expected") and text.count("\n") == 7


def test_missing_pages_are_404(keel: Keel, page: Page) -> None:
    login(page, keel)
    resp = page.goto(keel.url + "/evals/runs/nope")
    assert resp is not None and resp.status == 404
    resp = page.goto(keel.url + "/evals/compare?base=nope&head=nope")
    assert resp is not None and resp.status == 404
