"""The Alembic migrations build exactly the schema the SQLAlchemy models describe, on both dialects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from keel.store import make_engine, migrate
from keel.store.models import Base
from tests.conftest import BACKENDS

# tables a migration creates outside the ORM on purpose (full-text indexes and their shadow tables)
_RAW_TABLE_PREFIXES = ("span_fts", "spans_fts", "trace_fts", "traces_fts", "search_")


def _real(diff: Any) -> bool:
    """Differences that matter: not type spellings the two dialects render differently."""
    kind = diff[0] if isinstance(diff, tuple) else diff[0][0]
    if kind in ("modify_type", "modify_default", "modify_comment"):
        return False
    if kind in ("remove_table",) and str(diff[1].name).startswith(_RAW_TABLE_PREFIXES):
        return False
    if kind in ("remove_index", "remove_column") and isinstance(diff, tuple):
        obj = diff[1] if kind == "remove_index" else diff[3]
        table = getattr(obj, "table", None)
        name = getattr(table, "name", "") if table is not None else diff[2] if kind == "remove_column" else ""
        if str(name).startswith(_RAW_TABLE_PREFIXES) or str(getattr(obj, "name", "")).startswith("ix_fts"):
            return False
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_match_the_models(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path}/m.db" if backend == "sqlite" else request.getfixturevalue("pg_database")
    engine = make_engine(url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    real = [d for d in diffs if _real(d)]
    assert not real, "models and migrations disagree:\n" + "\n".join(map(str, real))


def test_migrations_run_twice_harmlessly(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/twice.db")
    try:
        migrate(engine)
        migrate(engine)
    finally:
        engine.dispose()
