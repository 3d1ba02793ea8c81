"""Access control: users with Argon2id password hashes, roles per project, key scopes per route class,
failed-login limits, session revocation, the audit trail, and the `keel users` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import anthropic
import httpx
import openai
import pytest
from sqlalchemy import select

from keel.store import access
from keel.store.models_access import User, UserSession
from tests.conftest import Keel

PASSWORD = "correct horse battery"


def _key(keel: Keel, project: str, scopes: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    r = keel.http.post("/api/keys", json={"project": project, "name": "k", "scopes": scopes, **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _account(keel: Keel, name: str, memberships: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    body = {"name": name, "password": PASSWORD, "memberships": memberships, **extra}
    r = keel.http.post("/api/accounts", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _login(keel: Keel, name: str, password: str = PASSWORD) -> httpx.Response:
    with httpx.Client(base_url=keel.url, follow_redirects=False) as c:
        return c.post("/login", data={"username": name, "password": password})


def _session(keel: Keel, name: str, password: str = PASSWORD) -> httpx.Client:
    r = _login(keel, name, password)
    assert r.status_code == 303, r.text
    return httpx.Client(
        base_url=keel.url, cookies={"keel_session": r.cookies["keel_session"]}, follow_redirects=False
    )


def _audit(keel: Keel, action: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = keel.http.get("/api/audit", params={"action": action, "limit": 1000}).json()[
        "data"
    ]
    return rows


# -- users and their passwords --------------------------------------------------------------------------


def test_passwords_are_argon2id_hashes_never_plaintext(keel: Keel) -> None:
    name = f"hash-{uuid.uuid4().hex[:6]}"
    proj = f"p-{name}"
    _key(keel, proj)
    user = _account(keel, name, [{"project": proj, "role": "viewer"}])
    assert "password" not in user and "password_hash" not in user
    with keel.store.engine.connect() as conn:
        stored = conn.execute(select(User.password_hash).where(User.id == user["id"])).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert access.verify_password(stored, PASSWORD) and not access.verify_password(stored, PASSWORD + "!")
    # two users with one password get different hashes (salted)
    other = _account(keel, name + "-2", [])
    with keel.store.engine.connect() as conn:
        assert stored != conn.execute(select(User.password_hash).where(User.id == other["id"])).scalar_one()
    # a short password and a duplicate name are refused in the API's error shape
    r = keel.http.post("/api/accounts", json={"name": name + "-3", "password": "short"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = keel.http.post("/api/accounts", json={"name": name, "password": PASSWORD})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


def test_session_tokens_are_stored_hashed_and_end_on_disable(keel: Keel) -> None:
    name = f"sess-{uuid.uuid4().hex[:6]}"
    proj = f"p-{name}"
    _key(keel, proj)
    user = _account(keel, name, [{"project": proj, "role": "developer"}])
    c = _session(keel, name)
    token = c.cookies["keel_session"]
    assert c.get("/traces").status_code == 200
    with keel.store.engine.connect() as conn:
        hashes = (
            conn.execute(select(UserSession.token_hash).where(UserSession.user_id == user["id"]))
            .scalars()
            .all()
        )
    assert hashes and token not in hashes
    # disabling the user ends the session at once, and they cannot sign in again
    r = keel.http.patch(f"/api/accounts/{user['id']}", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    r = c.get("/traces")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert _login(keel, name).status_code == 401
    keel.http.patch(f"/api/accounts/{user['id']}", json={"disabled": False})
    assert c.get("/traces").status_code == 303  # the old session stays ended
    # a password change ends sessions too
    c2 = _session(keel, name)
    assert c2.get("/traces").status_code == 200
    keel.http.patch(f"/api/accounts/{user['id']}", json={"password": "another long password"})
    assert c2.get("/traces").status_code == 303
    assert _login(keel, name, "another long password").status_code == 303
    # logging out revokes the session server-side (a copied cookie is worthless afterwards)
    c3 = _session(keel, name, "another long password")
    stolen = c3.cookies["keel_session"]
    c3.post("/logout")
    with httpx.Client(base_url=keel.url, cookies={"keel_session": stolen}, follow_redirects=False) as thief:
        assert thief.get("/traces").status_code == 303
    actions = {r["action"] for r in _audit(keel, "user.update") if r["target"] == user["id"]}
    assert actions == {"user.update"}


def test_failed_logins_are_rate_limited_per_user_and_ip_and_audited(keel: Keel) -> None:
    name = f"rl-{uuid.uuid4().hex[:6]}"
    proj = f"p-{name}"
    _key(keel, proj)
    _account(keel, name, [{"project": proj, "role": "viewer"}])
    for _ in range(5):
        r = _login(keel, name, "wrong password!")
        assert r.status_code == 401 and "not accepted" in r.text
    r = _login(keel, name, "wrong password!")
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    r = _login(keel, name)  # even the right password waits for the window
    assert r.status_code == 429
    # another user from the same address is not affected
    other = name + "-b"
    _account(keel, other, [{"project": proj, "role": "viewer"}])
    assert _login(keel, other).status_code == 303
    failed = [r for r in _audit(keel, "user.login_failed") if r["target"] == name]
    assert len(failed) == 7
    assert {r["details"]["reason"] for r in failed} == {"bad_credentials", "rate_limited"}
    ok = [r for r in _audit(keel, "user.login") if r["actor"] == f"user:{other}"]
    assert len(ok) == 1


def test_unknown_user_and_no_project(keel: Keel) -> None:
    assert _login(keel, f"ghost-{uuid.uuid4().hex[:6]}").status_code == 401
    name = f"lonely-{uuid.uuid4().hex[:6]}"
    _account(keel, name, [])
    r = _login(keel, name)
    assert r.status_code == 403 and "no project" in r.text


# -- roles per project ------------------------------------------------------------------------------------


def test_roles_per_project_and_project_switch(keel: Keel) -> None:
    run = uuid.uuid4().hex[:6]
    p1, p2 = f"r1-{run}", f"r2-{run}"
    k1 = _key(keel, p1, ["gateway", "ingest", "read", "admin"])
    k2 = _key(keel, p2)
    user = _account(
        keel, f"multi-{run}", [{"project": p1, "role": "admin"}, {"project": p2, "role": "viewer"}]
    )
    assert {(m["project"], m["role"]) for m in user["memberships"]} == {(p1, "admin"), (p2, "viewer")}
    c = _session(keel, f"multi-{run}")
    page = c.get("/traces").text
    assert "admin · project " + p1 in page and "project-switch" in page
    r = c.post("/account/project", data={"project": k2["project_id"]})
    assert r.status_code == 303
    assert "viewer · project " + p2 in c.get("/traces").text
    # a project the user is not in: refused
    other = _key(keel, f"r3-{run}")
    assert c.post("/account/project", data={"project": other["project_id"]}).status_code == 403
    # the viewer may not post any form; the admin (in p1) may
    r = c.post("/review", data={"name": "q", "score_name": "q"})
    assert r.status_code == 403
    c.post("/account/project", data={"project": k1["project_id"]})
    r = c.post("/review", data={"name": f"q-{run}", "score_name": "q"})
    assert r.status_code == 303
    # a project admin key manages its project's members; the change is audited
    h1 = {"authorization": f"Bearer {k1['key']}"}
    r = keel.http.put(f"/api/projects/{p1}/members/{user['id']}", json={"role": "developer"}, headers=h1)
    assert r.status_code == 200 and [m["role"] for m in r.json()["memberships"]] == ["developer"]
    members = keel.http.get(f"/api/projects/{p1}/members", headers=h1).json()
    assert [(m["user"], m["role"]) for m in members] == [(f"multi-{run}", "developer")]
    # ...but not another project's
    r = keel.http.put(f"/api/projects/{p2}/members/{user['id']}", json={"role": "admin"}, headers=h1)
    assert r.status_code == 404
    # and it sees the user's membership of its own project only
    seen = keel.http.get(f"/api/accounts/{user['id']}", headers=h1).json()
    assert [m["project"] for m in seen["memberships"]] == [p1]
    rec = [r for r in _audit(keel, "membership.set") if r["target"] == user["id"]]
    assert rec and rec[0]["details"] == {"user": f"multi-{run}", "role": "developer", "previous": "admin"}
    assert rec[0]["actor"] == f"key:{k1['id']}"
    # removing the membership of the project a session is looking at ends that view
    c.post("/account/project", data={"project": k1["project_id"]})
    assert keel.http.delete(f"/api/projects/{p1}/members/{user['id']}", headers=h1).status_code == 204
    assert c.get("/traces").status_code == 303


def test_developer_writes_prompts_but_not_keys_viewer_reads_only(keel: Keel) -> None:
    """Through the UI forms: a developer may move prompt labels; a viewer may not; neither makes keys."""
    run = uuid.uuid4().hex[:6]
    proj = f"dev-{run}"
    admin = _key(keel, proj, ["gateway", "ingest", "read", "admin"])
    ha = {"authorization": f"Bearer {admin['key']}"}
    name = f"pr-{run}"
    for text in ("one", "two"):
        r = keel.http.post("/api/prompts", json={"name": name, "type": "text", "template": text}, headers=ha)
        assert r.status_code == 201, r.text
    _account(keel, f"dev-{run}", [{"project": proj, "role": "developer"}])
    _account(keel, f"view-{run}", [{"project": proj, "role": "viewer"}])
    dev, viewer = _session(keel, f"dev-{run}"), _session(keel, f"view-{run}")
    r = viewer.post(f"/prompts/{name}/labels", data={"label": "production", "version": "1"})
    assert r.status_code == 403
    r = dev.post(f"/prompts/{name}/labels", data={"label": "production", "version": "2"})
    assert r.status_code == 303 and "notice" in r.headers["location"]
    got = keel.http.get(f"/api/prompts/{name}/versions/production", headers=ha).json()
    assert got["version"] == 2
    history = keel.http.get(f"/api/prompts/{name}/history", headers=ha).json()
    assert history[0]["actor"] == f"user:dev-{run}"
    assert 'data-testid="move-label"' not in viewer.get(f"/prompts/{name}").text


# -- key scopes per route class ---------------------------------------------------------------------------


def test_scopes_per_route_class(keel: Keel) -> None:
    run = uuid.uuid4().hex[:6]
    proj = f"sc-{run}"
    default = _key(keel, proj)
    assert default["scopes"] == ["gateway", "ingest", "read"]
    read_only = _key(keel, proj, ["read"])
    gateway_only = _key(keel, proj, ["gateway"])
    ingest_only = _key(keel, proj, ["ingest"])

    def chat(key: str) -> int:
        c = openai.OpenAI(base_url=keel.url + "/v1", api_key=key, max_retries=0, timeout=30)
        try:
            c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as err:
            assert err.body["code"] == "scope_required"  # type: ignore[index]
            return err.status_code
        return 200

    assert chat(gateway_only["key"]) == 200
    assert chat(read_only["key"]) == 403
    assert chat(ingest_only["key"]) == 403
    for path in ("/v1/models",):
        assert (
            httpx.get(keel.url + path, headers={"authorization": f"Bearer {read_only['key']}"}).status_code
            == 403
        )
    msgs = anthropic.Anthropic(base_url=keel.url, api_key=read_only["key"], max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError):
        msgs.messages.create(model="claude-haiku", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(
        keel.url + "/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": "x"},
        headers={"authorization": f"Bearer {read_only['key']}"},
    )
    assert r.status_code == 403
    # OTLP ingest needs "ingest"
    otlp = {"resourceSpans": []}
    for key, status in ((ingest_only, 200), (gateway_only, 403), (read_only, 403)):
        r = httpx.post(keel.url + "/v1/traces", json=otlp, headers={"authorization": f"Bearer {key['key']}"})
        assert r.status_code == status, (key["scopes"], r.text)
    # /api GET needs "read"
    for key, status in ((read_only, 200), (gateway_only, 403), (ingest_only, 403)):
        r = keel.http.get("/api/traces", headers={"authorization": f"Bearer {key['key']}"})
        assert r.status_code == status
        if status == 403:
            assert r.json()["error"]["code"] == "scope_required"
    # /api writes: a read-only key changes nothing; scores take "ingest"; admin areas need "admin"
    hr = {"authorization": f"Bearer {read_only['key']}"}
    assert (
        keel.http.post(
            "/api/scores", json={"trace_id": "0" * 32, "name": "x", "value": 1}, headers=hr
        ).status_code
        == 403
    )
    hi = {"authorization": f"Bearer {ingest_only['key']}"}
    assert (
        keel.http.post(
            "/api/scores", json={"trace_id": "0" * 32, "name": "x", "value": 1}, headers=hi
        ).status_code
        == 404
    )
    assert keel.http.post("/api/keys", json={"project": proj}, headers=hi).status_code == 403
    # scopes change through the API, take effect at once (the key cache reloads) and are audited
    r = keel.http.patch(f"/api/keys/{read_only['id']}", json={"scopes": ["read", "gateway"]})
    assert r.status_code == 200 and r.json()["scopes"] == ["gateway", "read"]
    assert chat(read_only["key"]) == 200
    rec = [x for x in _audit(keel, "key.scopes") if x["target"] == read_only["id"]]
    assert rec[0]["details"] == {"previous": ["read"], "scopes": ["gateway", "read"]}
    r = keel.http.patch(f"/api/keys/{read_only['id']}", json={"scopes": ["root"]})
    assert r.status_code == 400


def test_admin_scope_manages_its_own_project_only(keel: Keel) -> None:
    run = uuid.uuid4().hex[:6]
    mine, theirs = f"adm-{run}", f"oth-{run}"
    admin = _key(keel, mine, ["gateway", "ingest", "read", "admin"])
    other = _key(keel, theirs)
    h = {"authorization": f"Bearer {admin['key']}"}
    made = keel.http.post("/api/keys", json={"project": mine, "name": "child"}, headers=h)
    assert made.status_code == 201 and made.json()["project_id"] == admin["project_id"]
    assert keel.http.post("/api/keys", json={"project": theirs}, headers=h).status_code == 404
    listed = keel.http.get("/api/keys", headers=h).json()
    assert {k["project_id"] for k in listed} == {admin["project_id"]}
    assert keel.http.delete(f"/api/keys/{other['id']}", headers=h).status_code == 404
    assert keel.http.delete(f"/api/keys/{made.json()['id']}", headers=h).status_code == 200
    assert keel.http.post("/api/projects", json={"name": f"new-{run}"}, headers=h).status_code == 403
    assert (
        keel.http.post(
            "/api/accounts", json={"name": f"x-{run}", "password": PASSWORD}, headers=h
        ).status_code
        == 403
    )
    assert keel.http.get("/api/audit/verify", headers=h).status_code == 403


def test_existing_keys_keep_working_with_default_scopes(keel: Keel) -> None:
    """A key created before scopes existed (NULL scopes) gets the defaults: gateway, ingest, read."""
    from sqlalchemy import update

    from keel.store.models import ApiKey

    k = _key(keel, f"legacy-{uuid.uuid4().hex[:6]}")
    with keel.store.engine.begin() as conn:
        conn.execute(update(ApiKey).where(ApiKey.id == k["id"]).values(scopes=None))
    keel.app.state.keys.load()
    listed = [x for x in keel.http.get("/api/keys").json() if x["id"] == k["id"]]
    assert listed[0]["scopes"] == ["gateway", "ingest", "read"]
    p = keel.app.state.keys.lookup(k["key"])
    assert p is not None and p.scopes == {"gateway", "ingest", "read"}


# -- the CLI ------------------------------------------------------------------------------------------------


def _cli(keel: Keel, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    settings = keel.app.state.settings
    env = {
        **os.environ,
        "KEEL_DATABASE_URL": settings.database_url,
        "KEEL_MASTER_KEY": keel.master_key,
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "keel.cli", "users", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_users_cli(keel: Keel) -> None:
    run = uuid.uuid4().hex[:6]
    proj = f"cli-{run}"
    _key(keel, proj)
    name = f"cli-{run}"
    r = _cli(
        keel,
        "create",
        name,
        "--project",
        proj,
        "--role",
        "developer",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    assert _login(keel, name).status_code == 303
    r = _cli(keel, "list", "--project", proj)
    assert r.returncode == 0 and name in r.stdout and f"{proj}: developer" in r.stdout
    r = _cli(keel, "set-role", name, proj, "viewer")
    assert r.returncode == 0 and "viewer" in r.stdout
    r = _cli(keel, "passwd", name, "--password-stdin", stdin="a brand new password\n")
    assert r.returncode == 0
    assert _login(keel, name).status_code == 401
    assert _login(keel, name, "a brand new password").status_code == 303
    r = _cli(keel, "disable", name)
    assert r.returncode == 0
    assert _login(keel, name, "a brand new password").status_code == 401
    r = _cli(keel, "create", name, "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 1 and "exists already" in r.stderr
    r = _cli(keel, "set-role", name, "no-such-project", "admin")
    assert r.returncode == 1 and "not found" in r.stderr
    # the password is never an argument
    r = _cli(keel, "create", name + "x", "--password", PASSWORD)
    assert r.returncode == 2
    actions = [
        x["action"]
        for x in keel.http.get("/api/audit", params={"actor": "cli", "limit": 1000}).json()["data"]
    ]
    assert {"user.create", "membership.set", "user.update"} <= set(actions)
