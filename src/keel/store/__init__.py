"""Persistence: SQLAlchemy models, engines for SQLite and PostgreSQL, migrations, queries."""

from keel.store import models_access as _models_access  # noqa: F401  (registers the user tables)
from keel.store import models_audit as _models_audit  # noqa: F401  (registers the audit tables)
from keel.store import models_evals as _models_evals  # noqa: F401  (registers the eval tables)
from keel.store import models_prompts as _models_prompts  # noqa: F401  (registers the prompt tables)
from keel.store import models_review as _models_review  # noqa: F401  (online rules, review queues)
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
