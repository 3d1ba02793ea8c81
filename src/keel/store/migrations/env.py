"""Alembic environment: runs on the connection keel hands it (see keel.store.engine.migrate)."""

from alembic import context

from keel.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `keel db migrate` (keel.store.migrate)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
