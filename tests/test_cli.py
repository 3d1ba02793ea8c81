"""The `keel` command line, run as a real process."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import free_port

KEEL = [sys.executable, "-m", "keel.cli"]


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(env or {})}
    e.pop("KEEL_CONFIG", None)
    return subprocess.run([*KEEL, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def test_version_and_help(tmp_path: Path) -> None:
    r = run(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("keel, version ")
    r = run(["serve", "--help"], tmp_path)
    for opt in ("--config", "--host", "--port", "--workers"):
        assert opt in r.stdout


def test_invalid_config_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("models:\n  - name: a\n    provider: nosuch\n")
    r = run(["serve", "--config", "bad.yaml", "--port", str(free_port())], tmp_path)
    assert r.returncode == 2
    assert "models[0].provider" in r.stderr and "unknown provider 'nosuch'" in r.stderr
    assert "Traceback" not in r.stderr
    (tmp_path / "bad2.yaml").write_text("port: [1]\n")
    r = run(["serve", "--config", "bad2.yaml"], tmp_path)
    assert r.returncode == 2 and "invalid config: port" in r.stderr


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    r = run(["keys", "create", "--project", "cli", "--name", "ci-key", "--models", "a,b"], tmp_path)
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-keel-")
    r = run(["keys", "list", "--json"], tmp_path)
    assert r.returncode == 0 and secret not in r.stdout
    rows = orjson.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["models"] == ["a", "b"] and rows[0]["project"] == "cli"
    r = run(["keys", "revoke", rows[0]["id"]], tmp_path)
    assert r.returncode == 0 and "Revoked" in r.stderr
    rows = orjson.loads(run(["keys", "list", "--json"], tmp_path).stdout)
    assert rows[0]["status"] == "revoked"
    r = run(["keys", "revoke", "key_nope"], tmp_path)
    assert r.returncode == 1 and "not found" in r.stderr


def test_db_migrate_on_both_dialects(tmp_path: Path, pg_database: str) -> None:
    r = run(["db", "migrate"], tmp_path)
    assert r.returncode == 0 and (tmp_path / ".keel" / "keel.db").exists()
    r = run(["db", "migrate"], tmp_path, env={"KEEL_DATABASE_URL": pg_database})
    assert r.returncode == 0, r.stderr
    r = run(["db", "migrate"], tmp_path, env={"KEEL_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nope"})
    assert r.returncode == 2 and "cannot open the database" in r.stderr


def _wait_health(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"keel exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("keel did not become healthy")


def test_serve_generates_master_key_once_and_drains_traces_on_sigterm(tmp_path: Path, mock_upstream) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    (tmp_path / "keel.yaml").write_text(
        f"models:\n  - name: m\n    provider: openai-compatible\n    model: gpt-4o-mini\n    api_base: {mock_upstream.base_url}\n"
        # a long flush interval: without the drain on SIGTERM these traces would be lost
        "trace_flush_interval_s: 30\ntrace_batch_size: 100000\n"
    )
    env = {**os.environ, "KEEL_PORT": str(port)}
    env.pop("KEEL_MASTER_KEY", None)
    proc = subprocess.Popen(
        [*KEEL, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_health(url, proc)
        key_file = tmp_path / ".keel" / "master_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        h = {"authorization": f"Bearer {key}"}
        for i in range(20):
            r = httpx.post(
                url + "/v1/chat/completions",
                headers=h,
                json={"model": "m", "messages": [{"role": "user", "content": f"n{i}"}]},
            )
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn re-raises SIGTERM after a graceful shutdown, so the exit status is the signal's
    assert proc.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err
    assert err.count(key) == 1  # printed once, at generation
    from keel.store import Store

    store = Store.from_url(f"sqlite:///{tmp_path}/.keel/keel.db")
    assert store.count_traces() == 20
    # a second start does not print the key again
    proc = subprocess.Popen(
        [*KEEL, "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert key not in err


@pytest.mark.parametrize("workers", [2])
def test_serve_with_workers_and_postgres_redis(
    tmp_path: Path, mock_upstream, pg_database: str, redis_url: str, workers: int
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    (tmp_path / "keel.yaml").write_text(
        f"models:\n  - name: m\n    provider: openai-compatible\n    model: gpt-4o-mini\n    api_base: {mock_upstream.base_url}\n"
    )
    env = {
        **os.environ,
        "KEEL_DATABASE_URL": pg_database,
        "KEEL_REDIS_URL": redis_url,
        "KEEL_MASTER_KEY": "sk-master-x",
        "KEEL_KEY_REFRESH_S": "600",
    }
    project = "workers-" + uuid.uuid4().hex[:8]
    r = run(["keys", "create", "--project", project], tmp_path, env=env)
    secret = r.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen(
        [*KEEL, "serve", "--port", str(port), "--workers", str(workers)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_health(url, proc)
        h = {"authorization": f"Bearer {secret}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        # connections spread over both workers; every one knows the key
        for _ in range(10):
            with httpx.Client() as c:
                assert c.post(url + "/v1/chat/completions", headers=h, json=body).status_code == 200
        # revoked from the CLI: every worker hears it through Redis pub/sub (the periodic refresh is 600 s)
        listed = orjson.loads(run(["keys", "list", "--project", project, "--json"], tmp_path, env=env).stdout)
        assert len(listed) == 1
        key_id = listed[0]["id"]
        revoked = run(["keys", "revoke", key_id], tmp_path, env=env)
        assert revoked.returncode == 0 and "Notified" in revoked.stderr, revoked.stderr
        deadline = time.monotonic() + 10
        codes: list[int] = []
        while time.monotonic() < deadline:
            codes = []
            for _ in range(10):
                with httpx.Client() as c:
                    codes.append(c.post(url + "/v1/chat/completions", headers=h, json=body).status_code)
            if set(codes) == {401}:
                break
            time.sleep(0.2)
        assert set(codes) == {401}, codes
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
