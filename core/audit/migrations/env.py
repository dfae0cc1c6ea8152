"""Alembic environment of the audit log (run by :func:`core.audit.engine.upgrade`, or
``python -m core.audit upgrade``; no alembic.ini needed).

The connection comes from ``config.attributes["connection"]``. The whole migration runs in
one transaction under a lock, so that processes starting together upgrade once: SQLite's
``BEGIN IMMEDIATE`` (see ``core.audit.engine``), PostgreSQL's transaction advisory lock.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from core.audit.models import Base

MIGRATION_LOCK = 7_215_401_115  # PostgreSQL advisory lock key of the audit log's migrations

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - the library always passes one
    raise RuntimeError("core.audit migrations run through core.audit.engine.upgrade()")

context.configure(connection=connection, target_metadata=Base.metadata,
                  transactional_ddl=True, render_as_batch=connection.dialect.name == "sqlite",
                  compare_type=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
    context.run_migrations()
