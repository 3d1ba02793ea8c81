"""Shared fixtures: a real mock upstream, and keel itself served by uvicorn over real HTTP.

Backends: every test that uses the ``keel`` fixture runs against SQLite (in-process state) and
against PostgreSQL + Redis (the scale-out leg). The scale-out leg is required: when PostgreSQL
or Redis is unreachable those tests FAIL, they are not skipped. A developer without the services
may opt out explicitly with KEEL_TEST_BACKENDS=sqlite.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

try:  # the openai SDK imports httpx2 lazily; a lazy import racing across test threads can see it half-built
    import httpx2  # noqa: F401
except ImportError:
    pass

from keel.config import CooldownConfig, ModelConfig, RetryConfig, RoutingConfig, Settings
from keel.providers.local import local_available
from keel.providers.local_embeddings import local_embeddings_available
from keel.server import create_app
from keel.store import Store
from keel.testing import MockProvider

PG_ADMIN_URL = os.environ.get("KEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = [
    b.strip() for b in os.environ.get("KEEL_TEST_BACKENDS", "sqlite,postgresql").split(",") if b.strip()
]
MASTER_KEY = "sk-keel-master-test-0123456789"
# the UI tests drive Debian's chromium (nothing is downloaded by Playwright)
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 15_000
# one Redis namespace per test session: concurrent sessions on one Redis never see each other's state
REDIS_PREFIX = f"keel-test-{uuid.uuid4().hex[:8]}:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Runs an ASGI app under uvicorn in a background thread (its own event loop)."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 30s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockProvider]:
    with MockProvider() as mock:
        yield mock


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards)."""
    import psycopg

    name = "keel_test_" + uuid.uuid4().hex[:10]
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL leg cannot run: {PG_ADMIN_URL} unreachable ({exc}); set KEEL_TEST_BACKENDS=sqlite to opt out"
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
        r.ping()
        r.close()
    except Exception as exc:
        pytest.fail(
            f"Redis leg cannot run: {REDIS_URL} unreachable ({exc}); set KEEL_TEST_BACKENDS=sqlite to opt out"
        )
    return REDIS_URL


def test_models(mock: MockProvider) -> tuple[ModelConfig, ...]:
    """The model table the integration tests run against: real names priced by the catalog, and faults."""
    base = mock.base_url
    models = [
        ModelConfig(name="gpt-4o-mini", provider="openai", api_base=base, api_key="sk-upstream-openai"),
        ModelConfig(
            name="claude-haiku",
            provider="anthropic",
            model="claude-3-5-haiku-latest",
            api_base=mock.url,
            api_key="sk-upstream-anthropic",
        ),
        ModelConfig(
            name="cheap",
            provider="openai-compatible",
            model="my-finetune",
            api_base=base,
            input_cost_per_mtok=1.0,
            output_cost_per_mtok=2.0,
        ),
        ModelConfig(name="unpriced", provider="openai-compatible", model="mystery-model-x", api_base=base),
        ModelConfig(
            name="dead",
            provider="openai-compatible",
            model="gpt-4o-mini",
            api_base=f"http://127.0.0.1:{free_port()}/v1",
            timeout_s=5,
        ),
    ]
    for fault in ("500", "429", "reset", "badjson", "cut:3", "slow:0.3", "400", "context", "401", "empty"):
        models.append(
            ModelConfig(
                name=f"fault-{fault.split(':')[0]}",
                provider="openai-compatible",
                model=f"fault:{fault}",
                api_base=base,
            )
        )
    models.append(
        ModelConfig(name="claude-fault-cut", provider="anthropic", model="fault:cut:6", api_base=mock.url)
    )
    models.append(
        ModelConfig(name="claude-fault-500", provider="anthropic", model="fault:500", api_base=mock.url)
    )
    models.append(ModelConfig(name="text-embedding-3-small", provider="openai", api_base=base))
    if local_available():
        models.append(
            ModelConfig(name="local", provider="local", model="SmolLM2-135M-Instruct", max_tokens=32)
        )
    if local_embeddings_available():
        models.append(ModelConfig(name="minilm", provider="local", model="all-MiniLM-L6-v2"))
    return tuple(models)


class Keel:
    """A running keel, with helpers for tests."""

    def __init__(self, server: ServerThread, app: Any, backend: str) -> None:
        self.server = server
        self.app = app
        self.backend = backend
        self.url = server.url
        self.master_key = MASTER_KEY
        self.store: Store = app.state.store
        self.http = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=30
        )

    def wait_for_trace(self, trace_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """Poll the API until the trace is stored (the writer is asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.http.get(f"/api/traces/{trace_id}")
            if r.status_code == 200:
                return dict(r.json())
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"trace {trace_id} not stored after {timeout}s (last status {r.status_code})"
                )
            time.sleep(0.05)

    def create_key(
        self, project: str = "default", models: list[str] | None = None, name: str = "test"
    ) -> dict[str, Any]:
        r = self.http.post("/api/keys", json={"project": project, "name": name, "models": models})
        assert r.status_code == 201, r.text
        return dict(r.json())


def make_keel(
    backend: str, tmp: Path, mock: MockProvider, request: pytest.FixtureRequest, **overrides: Any
) -> tuple[ServerThread, Any]:
    if backend == "sqlite":
        db_url, redis = f"sqlite:///{tmp}/keel.db", None
    elif backend == "postgresql":
        db_url, redis = request.getfixturevalue("pg_database"), request.getfixturevalue("redis_url")
    else:
        raise ValueError(backend)
    # the shared instance sees many deliberate faults: no cooldowns there (tests of cooldowns build their own)
    overrides.setdefault(
        "routing",
        RoutingConfig(
            cooldown=CooldownConfig(allowed_fails=1_000_000), retry=RetryConfig(backoff_base_s=0.01)
        ),
    )
    overrides.setdefault("models", test_models(mock))
    settings = Settings(
        database_url=db_url,
        redis_url=redis,
        redis_prefix=REDIS_PREFIX,
        master_key=MASTER_KEY,
        data_dir=str(tmp),
        trace_flush_interval_s=0.05,
        **overrides,
    )
    store = Store.from_url(db_url)
    app = create_app(settings, store=store)
    return ServerThread(app).start(), app


@pytest.fixture(scope="module", params=BACKENDS)
def keel(
    request: pytest.FixtureRequest, mock_upstream: MockProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    """keel served over HTTP in front of the mock upstream, on each backend."""
    backend = request.param
    server, app = make_keel(backend, tmp_path_factory.mktemp(f"keel-{backend}"), mock_upstream, request)
    k = Keel(server, app, backend)
    try:
        yield k
    finally:
        k.http.close()
        server.stop()


# -- the browser, for the UI tests ---------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS, timeout=30_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) per test; fails the test on JS errors or CSP violations."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    ctx.set_default_timeout(UI_TIMEOUT_MS)
    ctx.set_default_navigation_timeout(UI_TIMEOUT_MS)
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(msg: Any) -> None:
        if msg.type == "error" and "Content Security Policy" in msg.text:
            problems.append(f"CSP violation: {msg.text}")

    pg.on("console", on_console)
    try:
        yield pg
    finally:
        ctx.close()
    assert not problems, problems
