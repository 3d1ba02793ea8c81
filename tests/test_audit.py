"""The audit log: every administrative action recorded, append-only, and tampering detected."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from keel.store import Store, audit
from tests.conftest import BACKENDS, PG_ADMIN_URL, Keel
from tests.test_cli import run


@pytest.fixture(params=BACKENDS)
def fresh_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, str]]:
    """A store of its own (tampering must not touch the shared test database)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/audit.db"
        store = Store.from_url(url)
        yield store, url
        store.close()
        return
    import psycopg

    name = "keel_audit_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    store = Store.from_url(url)
    try:
        yield store, url
    finally:
        store.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_triggers(store: Store) -> None:
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.execute(text("DROP TRIGGER audit_log_append_only ON audit_log"))
        else:
            conn.execute(text("DROP TRIGGER audit_log_no_update"))
            conn.execute(text("DROP TRIGGER audit_log_no_delete"))


def test_admin_actions_through_the_api_are_recorded(keel: Keel) -> None:
    project = "aud-" + uuid.uuid4().hex[:6]
    assert keel.http.post("/api/projects", json={"name": project, "limits": {"rpm": 10}}).status_code == 201
    assert keel.http.post("/api/teams", json={"project": project, "name": "ops"}).status_code == 201
    key = keel.create_key(project=project, name="auditee")
    assert keel.http.delete(f"/api/keys/{key['id']}").status_code == 200
    rows = keel.http.get("/api/audit", params={"limit": 50}).json()["data"]
    mine = [r for r in rows if r["project_id"] == key["project_id"]]
    assert [r["action"] for r in mine[:4]] == ["key.revoke", "key.create", "team.upsert", "project.upsert"]
    assert all(r["actor"] == "master" for r in mine[:4])
    assert mine[1]["target"] == key["id"] and mine[1]["details"]["name"] == "auditee"
    assert "key" not in mine[1]["details"]  # the secret never reaches the log
    v = keel.http.get("/api/audit/verify").json()
    assert v["ok"] is True and v["checked"] == v["head_seq"] >= 4
    # a project's own key sees its project's records only, and may not run the verification
    other = keel.create_key(project="aud-other-" + uuid.uuid4().hex[:6])
    seen = keel.http.get("/api/audit", headers={"authorization": f"Bearer {other['key']}"}).json()["data"]
    assert all(r["project_id"] == other["project_id"] for r in seen)
    assert (
        keel.http.get("/api/audit/verify", headers={"authorization": f"Bearer {other['key']}"}).status_code
        == 403
    )


def test_the_log_is_append_only(fresh_store: tuple[Store, str]) -> None:
    store, _ = fresh_store
    audit.record(store, actor="master", action="key.create", target="k1", details={"name": "a"})
    for sql in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"), store.engine.begin() as conn:
            conn.execute(text(sql))
    assert audit.verify(store).ok


@pytest.mark.parametrize(
    ("tamper", "bad_seq", "problem"),
    [
        ('UPDATE audit_log SET details = \'{"name": "b"}\' WHERE seq = 2', 2, "content does not match"),
        ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1", 1, "content does not match"),
        ("DELETE FROM audit_log WHERE seq = 2", 2, "record 2 is missing"),
        ("DELETE FROM audit_log WHERE seq = 3", 3, "chain ends at 2 but its head says 3"),
    ],
)
def test_tampering_is_detected(
    fresh_store: tuple[Store, str], tamper: str, bad_seq: int, problem: str
) -> None:
    store, url = fresh_store
    for i in range(3):
        audit.record(store, actor="master", action="prompt.label", target=f"p{i}", details={"name": "a"})
    assert audit.verify(store).ok
    _drop_triggers(store)  # what someone with database access could do
    if store.dialect == "postgresql":
        tamper = tamper.replace("details = '", "details = CAST('").replace("}'", "}' AS JSONB)")
    with store.engine.begin() as conn:
        conn.execute(text(tamper))
    v = audit.verify(store)
    assert not v.ok and v.first_bad_seq == bad_seq and problem in (v.problem or "")
    if "details" not in tamper:
        return
    # the CLI says so and fails
    r = run(["audit", "verify"], Path("/tmp"), env={"KEEL_DATABASE_URL": url})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "TAMPERED" in r.stdout and f"record {bad_seq}" in r.stdout


def test_concurrent_writers_extend_one_chain(fresh_store: tuple[Store, str]) -> None:
    store, url = fresh_store
    errors: list[Any] = []

    def writer(n: int) -> None:
        try:
            for i in range(25):
                audit.record(store, actor=f"key:w{n}", action="key.create", target=f"{n}-{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    v = audit.verify(store)
    assert v.ok and v.checked == v.head_seq == 100
    r = run(["audit", "verify"], Path("/tmp"), env={"KEEL_DATABASE_URL": url})
    assert r.returncode == 0 and "audit log OK: 100 records" in r.stdout
    listed = run(["audit", "list", "--limit", "3", "--json"], Path("/tmp"), env={"KEEL_DATABASE_URL": url})
    assert listed.returncode == 0 and listed.stdout.count("\n") == 3


def test_cli_key_commands_are_audited(tmp_path: Path) -> None:
    env = {"KEEL_DATABASE_URL": f"sqlite:///{tmp_path}/k.db"}
    created = run(["keys", "create", "--project", "p", "--name", "ci"], tmp_path, env=env)
    assert created.returncode == 0, created.stderr
    store = Store.from_url(env["KEEL_DATABASE_URL"])
    try:
        rows = audit.list_records(store)
        assert rows[0]["action"] == "key.create" and rows[0]["actor"].startswith("cli:")
        assert audit.verify(store).ok
    finally:
        store.close()


def test_prompt_changes_join_the_chain(keel: Keel) -> None:
    name = "aud-prompt-" + uuid.uuid4().hex[:6]
    r = keel.http.post("/api/prompts", json={"name": name, "type": "text", "template": "Hello {{ who }}"})
    assert r.status_code == 201, r.text
    r = keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 1})
    assert r.status_code in (200, 201), r.text
    rows = keel.http.get("/api/audit", params={"limit": 20}).json()["data"]
    mine = [(x["action"], x["details"].get("label")) for x in rows if x["target"] == name]
    assert ("prompt.label", "production") in mine and any(a == "prompt.create" for a, _ in mine)
    assert keel.http.get("/api/audit/verify").json()["ok"] is True


def test_configuration_changes_are_recorded_once(fresh_store: tuple[Store, str]) -> None:
    from keel.config import ModelConfig, Settings
    from keel.server.app import config_sections

    store, _ = fresh_store
    a = Settings(models=(ModelConfig(name="m", provider="openai", api_key="sk-proj-aaaaaaaaaaaaaaaaaaaa"),))
    first = audit.record_config(store, config_sections(a))
    assert first is not None and first["details"]["first"] is True
    assert audit.record_config(store, config_sections(a)) is None  # a restart with the same config: nothing
    rotated = Settings(
        models=(ModelConfig(name="m", provider="openai", api_key="sk-proj-bbbbbbbbbbbbbbbbbbbb"),)
    )
    changed = audit.record_config(store, config_sections(rotated))
    assert changed is not None and changed["details"]["changed"] == ["models"]
    assert "sk-proj-" not in str(changed)  # a key rotation shows as a new fingerprint, never the key
    assert audit.verify(store).ok
