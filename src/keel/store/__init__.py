"""Persistence: SQLAlchemy models, engines for SQLite and PostgreSQL, migrations, queries."""

from keel.store.engine import make_engine, migrate, normalise_url
from keel.store.repo import KeyRow, Store, TraceFilter, from_epoch, hash_key, iso, utcnow

__all__ = [
    "KeyRow",
    "Store",
    "TraceFilter",
    "from_epoch",
    "hash_key",
    "iso",
    "make_engine",
    "migrate",
    "normalise_url",
    "utcnow",
]
