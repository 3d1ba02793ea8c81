"""Organisation model (teams, end users, metadata) and /api/usage aggregation, on both backends."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Keel


def send(
    k: Keel, key: str, model: str = "gpt-4o-mini", user: str | None = None, tags: str | None = None
) -> str:
    c = openai.OpenAI(base_url=k.url + "/v1", api_key=key, max_retries=0)
    kw: dict[str, Any] = {"extra_headers": {"x-keel-tags": tags}} if tags else {}
    if user:
        kw["user"] = user
    try:
        raw = c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}], **kw
        )
    except openai.APIStatusError as exc:
        return str(exc.response.headers["x-keel-trace-id"])
    return str(raw.headers["x-keel-trace-id"])


def test_teams_keys_and_usage(keel: Keel) -> None:
    project = "org-" + uuid.uuid4().hex[:6]
    r = keel.http.post("/api/teams", json={"project": project, "name": "search", "limits": {"budget_usd": 5}})
    assert r.status_code == 201 and r.json()["limits"] == {"budget_usd": 5}
    k_search = keel.http.post("/api/keys", json={"project": project, "team": "search", "name": "s"}).json()
    k_ads = keel.http.post(
        "/api/keys", json={"project": project, "team": "ads", "user": "bot-7", "name": "a"}
    ).json()
    assert k_search["team"] == "search" and k_ads["team"] == "ads" and k_ads["user"] == "bot-7"
    teams = {t["name"] for t in keel.http.get("/api/teams", params={"project": project}).json()}
    assert teams == {"search", "ads"}

    ids = [send(keel, k_search["key"], user="alice", tags="feature:search") for _ in range(3)]
    ids += [send(keel, k_ads["key"], model="cheap", tags="feature:ads") for _ in range(2)]
    ids.append(send(keel, k_ads["key"], model="fault-500"))
    for t in ids:
        keel.wait_for_trace(t)
    # the ads key's requests are attributed to its end user
    assert keel.wait_for_trace(ids[3])["user"] == "bot-7"
    assert keel.wait_for_trace(ids[0])["user"] == "alice"

    def usage(group_by: str, key: str | None = None, **params: Any) -> dict[str, Any]:
        h = {"authorization": f"Bearer {key}"} if key else None
        r = keel.http.get(
            "/api/usage", params={"group_by": group_by, "project": project, **params}, headers=h
        )
        assert r.status_code == 200, r.text
        return dict(r.json())

    by_team = {row["group"]: row for row in usage("team")["data"]}
    assert by_team[k_search["team_id"]]["requests"] == 3 and by_team[k_ads["team_id"]]["requests"] == 3
    assert by_team[k_ads["team_id"]]["errors"] == 1
    by_model = {row["group"]: row for row in usage("model")["data"]}
    assert by_model["gpt-4o-mini"]["requests"] == 3 and by_model["cheap"]["requests"] == 2
    assert by_model["cheap"]["cost_usd"] == pytest.approx(
        (by_model["cheap"]["input_tokens"] * 1.0 + by_model["cheap"]["output_tokens"] * 2.0) / 1e6
    )
    by_user = {row["group"]: row["requests"] for row in usage("user")["data"]}
    assert by_user == {"alice": 3, "bot-7": 3}
    by_key = {row["group"]: row["requests"] for row in usage("key")["data"]}
    assert by_key == {k_search["id"]: 3, k_ads["id"]: 3}
    by_tag = {row["group"]: row["requests"] for row in usage("tag")["data"]}
    assert by_tag == {"feature:search": 3, "feature:ads": 2}
    totals = usage("model")["totals"]
    assert totals["requests"] == 6 and totals["cost_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in usage("team")["data"])
    )
    # time range: nothing in the future
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert usage("model", start=future)["data"] == []
    # a project key sees its own project only, whatever it asks for
    own = usage("project", key=k_search["key"], project="default")
    assert [row["group"] for row in own["data"]] == [k_search["project_id"]]
    r = httpx.get(
        keel.url + "/api/usage",
        params={"group_by": "colour"},
        headers={"authorization": f"Bearer {keel.master_key}"},
    )
    assert r.status_code == 400


def test_cli_creates_keys_with_team_and_user(tmp_path: Any) -> None:
    import subprocess
    import sys

    import orjson

    env = {"KEEL_DATA_DIR": str(tmp_path / ".keel"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "keel.cli", "keys", "create", "--project", "p", "--team", "t", "--user", "u"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    rows = orjson.loads(
        subprocess.run(
            [sys.executable, "-m", "keel.cli", "keys", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        ).stdout
    )
    assert rows[0]["team"] == "t" and rows[0]["user"] == "u"
