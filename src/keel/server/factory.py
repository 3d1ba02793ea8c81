"""Entry point for uvicorn workers: settings from the environment the CLI prepared."""

from __future__ import annotations

import os

from keel.config import load_settings
from keel.server.app import KeelApp, create_app, database_url
from keel.store import Store

__all__ = ["app_from_env"]


def app_from_env() -> KeelApp:
    """Build the app in a worker process; `keel serve` has already migrated the database."""
    settings = load_settings()
    migrated = os.environ.get("KEEL_SKIP_MIGRATIONS") == "1"
    store = Store.from_url(database_url(settings), run_migrations=not migrated)
    return create_app(settings, store=store, tune_gc=True)
