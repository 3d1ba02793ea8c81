"""Review pages in headless chromium (Debian /usr/bin/chromium via Playwright), on both backends: create a
queue, pick traces into it, review them with the keyboard only (j/k, 1-5 and y/n, c, s), see the human
scores on the traces, and send the reviewed items to a dataset. JS errors and CSP violations fail a test.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.sync_api import Page, expect

from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel
from tests.eval_judges_support import admin_key, start_keel

pytestmark = [pytest.mark.ui, pytest.mark.timeout(240)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module", params=BACKENDS)
def uk(
    request: pytest.FixtureRequest, mock_upstream: MockProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    k = start_keel(request.param, tmp_path_factory.mktemp("ui-review"), mock_upstream, request)
    yield k
    k.http.close()
    k.server.stop()


def login(page: Page, k: Keel, then: str) -> None:
    page.goto(k.url + "/login?next=" + then)
    page.fill("#key", k.master_key)
    page.click("form.auth-form button[type=submit]")
    page.wait_for_url(re.compile(re.escape(then) + "$"))


def traces(k: Keel, n: int, word: str) -> list[str]:
    client = openai.OpenAI(base_url=k.url + "/v1", api_key=k.master_key, max_retries=0, timeout=30)
    ids = []
    for i in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"{word} number {i}"}]
        )
        ids.append(raw.headers["x-keel-trace-id"])
    client.close()
    for t in ids:
        k.wait_for_trace(t)
    return ids


def human_scores(k: Keel, trace_id: str, name: str) -> list[Any]:
    data = k.http.get("/api/scores", params={"trace_id": trace_id, "name": name}).json()["data"]
    return [(s["value"], s["source"], s["comment"]) for s in data]


def test_review_a_queue_with_the_keyboard(uk: Keel, page: Page) -> None:
    word = "kbd-" + uuid.uuid4().hex[:6]
    ids = traces(uk, 3, word)
    login(page, uk, "/review")
    expect(page.get_by_test_id("nav-review")).to_have_class(re.compile("active"))

    # create a queue from the page
    qname = "UI queue " + word
    page.get_by_test_id("queue-name").fill(qname)
    page.get_by_test_id("create-queue-submit").click()
    expect(page.get_by_test_id("queue-title")).to_have_text(qname)
    expect(page.get_by_test_id("empty")).to_be_visible()

    # pick the traces into it (any text with trace ids in it)
    page.get_by_test_id("trace-ids").fill("\n".join(f"trace {t}," for t in ids))
    page.get_by_test_id("add-traces-submit").click()
    expect(page.get_by_test_id("notice")).to_contain_text("3 trace(s) added.")
    expect(page.get_by_test_id("item-row")).to_have_count(3)
    queue_url = page.url.split("?")[0]

    page.get_by_test_id("start-review").click()
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[0])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live
    expect(page.get_by_test_id("item-input")).to_contain_text(f"{word} number 0")
    expect(page.get_by_test_id("item-output")).to_contain_text("Mock reply to:")

    # j / k move between items without scoring
    page.keyboard.press("j")
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[1])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live
    page.keyboard.press("k")
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[0])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live

    # 4, c, type a comment, Esc, s: scored and on to the next pending item
    page.keyboard.press("4")
    expect(page.locator('input[name="value"][value="4"]')).to_be_checked()
    page.keyboard.press("c")
    expect(page.get_by_test_id("comment")).to_be_focused()
    page.keyboard.type("sharp and correct")  # typing 's' or 'j' here must not trigger shortcuts
    page.keyboard.press("Escape")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"review-item-{uk.backend}.png"), full_page=True)
    page.keyboard.press("s")
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[1])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live

    # submitting without a score says so and stays
    page.keyboard.press("s")
    expect(page.get_by_test_id("error")).to_contain_text("Pick a score first")
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[1])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live
    page.keyboard.press("2")
    page.keyboard.press("s")
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[2])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live
    page.get_by_test_id("skip").click()

    # the last one done: back on the queue page, every item accounted for
    page.wait_for_url(re.compile(re.escape(queue_url) + r"\?notice="))
    expect(page.get_by_test_id("notice")).to_contain_text("nothing left to review")
    expect(page.get_by_test_id("queue-counts")).to_have_text("0 pending · 2 done · 1 skipped")
    values = page.get_by_test_id("item-value").all_inner_texts()
    assert values == ["4", "2", "—"]
    assert human_scores(uk, ids[0], "quality") == [(4.0, "human", "sharp and correct")]
    assert human_scores(uk, ids[1], "quality") == [(2.0, "human", None)]
    assert human_scores(uk, ids[2], "quality") == []

    # the scores show on the trace page
    page.goto(uk.url + f"/traces/{ids[0]}")
    expect(page.get_by_test_id("trace-scores")).to_contain_text("sharp and correct")

    # reviewed items to a dataset
    page.goto(queue_url)
    ds = "ui-reviewed-" + word
    page.get_by_test_id("dataset-name").fill(ds)
    page.get_by_test_id("to-dataset-submit").click()
    expect(page.get_by_test_id("notice")).to_contain_text(f"Dataset {ds} v1: 2 added")
    items = uk.http.get(f"/api/datasets/{ds}/items", params={"project": "default"}).json()["data"]
    assert sorted(i["metadata"]["review"]["quality"] for i in items) == [2.0, 4.0]
    page.screenshot(path=str(ARTIFACTS / f"review-queue-{uk.backend}.png"), full_page=True)


def test_yes_no_queue_and_missing_pages(uk: Keel, page: Page) -> None:
    ids = traces(uk, 2, "yn-" + uuid.uuid4().hex[:6])
    q = uk.http.post(
        "/api/annotation-queues", json={"name": "yes-no", "score_name": "on_topic", "score_type": "boolean"}
    ).json()
    uk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": ids})
    login(page, uk, f"/review/{q['id']}")
    page.get_by_test_id("start-review").click()
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[0])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live
    page.keyboard.press("5")  # not a key of a yes/no queue: nothing picked
    expect(page.locator('input[name="value"]:checked')).to_have_count(0)
    page.keyboard.press("y")
    page.keyboard.press("s")
    expect(page.get_by_test_id("item-trace")).to_have_text(ids[1])
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live
    page.keyboard.press("n")
    page.keyboard.press("s")
    page.wait_for_url(re.compile(r"/review/" + q["id"] + r"\?notice="))
    got = [human_scores(uk, t, "on_topic") for t in ids]
    assert got == [[(True, "human", None)], [(False, "human", None)]]
    page.goto(uk.url + "/review")
    expect(page.locator('[data-testid="queue-row"][data-name="yes-no"]').first).to_be_visible()

    r = page.goto(uk.url + "/review/aq_nope")
    assert r is not None and r.status == 404
    expect(page.get_by_test_id("not-found")).to_contain_text("No such queue")
    r = page.goto(uk.url + f"/review/{q['id']}/items/999999")
    assert r is not None and r.status == 404


def test_review_pages_need_a_login(uk: Keel, page: Page) -> None:
    page.goto(uk.url + "/review")
    page.wait_for_url(re.compile(r"/login"))


def test_a_key_without_the_right_may_look_but_not_review(uk: Keel, page: Page) -> None:
    project = "g2-ui-" + uuid.uuid4().hex[:6]
    admin = admin_key(uk, project)
    plain = uk.create_key(project=project)["key"]
    client = openai.OpenAI(base_url=uk.url + "/v1", api_key=admin, max_retries=0, timeout=30)
    tid = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "look only"}]
    ).headers["x-keel-trace-id"]
    client.close()
    uk.wait_for_trace(tid)
    auth = {"authorization": f"Bearer {admin}"}
    q = uk.http.post("/api/annotation-queues", json={"name": "look", "score_name": "q"}, headers=auth).json()
    uk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": [tid]}, headers=auth)
    page.goto(uk.url + f"/login?next=/review/{q['id']}")
    page.fill("#key", plain)
    page.click("form.auth-form button[type=submit]")
    page.get_by_test_id("start-review").click()
    expect(page.get_by_test_id("item-trace")).to_have_text(tid)
    expect(page.locator("#review[data-shortcuts=on]")).to_have_count(1)  # keys are live
    page.keyboard.press("3")
    page.keyboard.press("s")
    expect(page.get_by_test_id("error")).to_contain_text("Reviewing needs the right to change annotations")
    assert uk.http.get("/api/scores", params={"trace_id": tid}).json()["data"] == []
