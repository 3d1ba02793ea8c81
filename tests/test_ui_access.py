"""The UI's user sign-in, end to end in headless chromium: password login, the project switcher, and a
viewer who sees no write controls and whose forged form post is refused."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from playwright.sync_api import Page, expect

pytestmark = [pytest.mark.ui, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PASSWORD = "a long enough password"


def _setup(keel: Any) -> dict[str, Any]:
    """Two projects, each with a trace and a prompt; one user: developer in the first, viewer in the second."""
    run = uuid.uuid4().hex[:6]
    out: dict[str, Any] = {"run": run, "user": f"ui-user-{run}"}
    memberships = []
    for tag, role in (("one", "developer"), ("two", "viewer")):
        proj = f"ui-{tag}-{run}"
        key = keel.http.post(
            "/api/keys", json={"project": proj, "scopes": ["gateway", "ingest", "read", "admin"]}
        ).json()
        client = openai.OpenAI(base_url=keel.url + "/v1", api_key=key["key"], max_retries=0, timeout=30)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"hello from {tag}"}]
        )
        tid = raw.headers["x-keel-trace-id"]
        keel.wait_for_trace(tid)
        h = {"authorization": f"Bearer {key['key']}"}
        for text in ("v1 {{ q }}", "v2 {{ q }}"):
            r = keel.http.post(
                "/api/prompts",
                json={"name": f"pr-{tag}-{run}", "type": "text", "template": text, "labels": ["production"]},
                headers=h,
            )
            assert r.status_code == 201, r.text
        out[tag] = {"project": proj, "project_id": key["project_id"], "trace": tid, "key": key["key"]}
        memberships.append({"project": proj, "role": role})
    r = keel.http.post(
        "/api/accounts", json={"name": out["user"], "password": PASSWORD, "memberships": memberships}
    )
    assert r.status_code == 201, r.text
    return out


def _sign_in(page: Page, keel: Any, name: str, password: str) -> None:
    page.goto(keel.url + "/login")
    page.click("[data-testid=tab-user]")
    page.fill("#username", name)
    page.fill("#password", password)
    page.click("[data-testid=user-login-submit]")


def test_password_login_switch_project_and_viewer_limits(page: Page, keel: Any) -> None:
    s = _setup(keel)
    run, one, two = s["run"], s["one"], s["two"]
    # a wrong password stays on the sign-in page with an error
    _sign_in(page, keel, s["user"], "not the password")
    expect(page.locator("[data-testid=login-error]")).to_contain_text("not accepted")
    _sign_in(page, keel, s["user"], PASSWORD)
    page.wait_for_url(re.compile(r"/traces(\?.*)?$"))
    expect(page.locator("[data-testid=who]")).to_have_text(s["user"])
    # the first project (alphabetical): developer, its trace only
    expect(page.locator("[data-testid=who-detail]")).to_contain_text(f"developer · project {one['project']}")
    expect(page.locator(f"tr[data-trace-id='{one['trace']}']")).to_have_count(1)
    expect(page.locator(f"tr[data-trace-id='{two['trace']}']")).to_have_count(0)
    # a developer sees the prompt's write controls and may move a label
    page.goto(keel.url + f"/prompts/pr-one-{run}")
    expect(page.locator("[data-testid=move-label]")).to_be_visible()
    page.goto(keel.url + f"/prompts/pr-two-{run}")  # another project's prompt: not here
    expect(page.locator("[data-testid=prompt-missing]")).to_be_visible()
    # switch to the second project, where the user is a viewer
    page.goto(keel.url + "/traces")
    page.select_option("[data-testid=project-select]", two["project_id"])
    page.click("[data-testid=project-switch-go]")
    page.wait_for_url(re.compile(r"/traces$"))
    expect(page.locator("[data-testid=who-detail]")).to_contain_text(f"viewer · project {two['project']}")
    expect(page.locator(f"tr[data-trace-id='{two['trace']}']")).to_have_count(1)
    expect(page.locator(f"tr[data-trace-id='{one['trace']}']")).to_have_count(0)
    page.goto(keel.url + f"/prompts/pr-two-{run}")
    expect(page.locator("[data-testid=versions-table]")).to_be_visible()
    expect(page.locator("[data-testid=move-label]")).to_have_count(0)  # no write buttons for a viewer
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-access-viewer-{keel.backend}.png"), full_page=True)
    # a forged post with the viewer's own session cookie is refused, and nothing moved
    cookie = next(c for c in page.context.cookies() if c["name"] == "keel_session")
    with httpx.Client(
        base_url=keel.url, cookies={"keel_session": cookie["value"]}, follow_redirects=False
    ) as c:
        r = c.post(f"/prompts/pr-two-{run}/labels", data={"label": "production", "version": "1"})
        assert r.status_code == 403
    h = {"authorization": f"Bearer {two['key']}"}
    assert keel.http.get(f"/api/prompts/pr-two-{run}/versions/production", headers=h).json()["version"] == 2
    # signing out ends the session on the server
    page.click("[data-testid=logout]")
    page.wait_for_url(re.compile(r"/login"))
    with httpx.Client(
        base_url=keel.url, cookies={"keel_session": cookie["value"]}, follow_redirects=False
    ) as c:
        assert c.get("/traces").status_code == 303
