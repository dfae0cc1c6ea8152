"""Where the audit log lives and how it is opened and migrated.

* ``CXR_DB_URL`` (an SQLAlchemy URL) chooses the database. Unset: an SQLite file,
  ``audit.db`` in the user's data folder (:func:`data_dir`: ``~/.local/share/cxr-insight`` on
  Linux, ``~/Library/Application Support/cxr-insight`` on macOS,
  ``%LOCALAPPDATA%\\cxr-insight`` on Windows; ``CXR_DATA_HOME`` overrides the folder),
  created on first use. For a shared deployment, PostgreSQL through psycopg 3:
  ``postgresql+psycopg://user:password@host:5432/cxr`` (``postgresql://`` is taken as psycopg 3
  too); connections time out after 3 s and statements after 10 s, so that a server that is
  down or hangs costs a prediction seconds at most (the record is then spooled).
* SQLite runs in WAL mode (readers never block the writer), a 30 s busy timeout, and write
  transactions that start with ``BEGIN IMMEDIATE`` (the write lock is taken at the start, so
  concurrent writers queue instead of failing half-way). ``synchronous=NORMAL`` by default:
  a committed record survives any crash of the process (SIGKILL included), and a power
  loss or OS crash can lose only the last commits since a checkpoint, never corrupt the
  file; ``CXR_AUDIT_SYNC=full`` makes every commit wait for an fsync as well (durable across
  a power loss; it costs one fsync per record, about 5-8 ms on a virtual disk, against
  about 0.1-0.5 ms).
* The schema is Alembic's (``migrations/``): :func:`ensure_schema` upgrades a database that is
  behind on first use; a database written by a newer version is refused
  (:class:`AuditSchemaError`) rather than written to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url

from core.errors import ConfigError, CXRError
from core.files import APP_NAME, data_dir

log = logging.getLogger(__name__)

DB_FILE = "audit.db"
SPOOL_FILE = "audit-spool.jsonl"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
PG_CONNECT_TIMEOUT_S = 3
PG_STATEMENT_TIMEOUT_S = 10.0
SQLITE_SYNC = ("NORMAL", "FULL")


class AuditSchemaError(CXRError, RuntimeError):
    """The audit database's schema cannot be used by this version (newer, or unknown)."""


def default_url() -> str:
    """``CXR_DB_URL``, else the SQLite file in :func:`data_dir`."""
    url = os.environ.get("CXR_DB_URL", "").strip()
    return normalise_url(url) if url else f"sqlite:///{data_dir() / DB_FILE}"


def normalise_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` -> psycopg 3's ``postgresql+psycopg://``."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL (None for in-memory or other engines)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for ``url`` with the audit log's settings (see the module docstring).

    Write with ``engine.begin()``; SQLite's transactions then start with ``BEGIN IMMEDIATE``.
    Read-only work can pass ``execution_options(sqlite_deferred=True)`` on its connection.
    """
    url = normalise_url(url)
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_size=pool_size, max_overflow=10, hide_parameters=True,
                               connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S,
                                             "check_same_thread": False})
        _sqlite_settings(engine)
        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True,
                           hide_parameters=True,
                           connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S,
                                         "application_name": APP_NAME})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # A server that hangs (a lock held, a full disk) must not hang the prediction: the
        # statement fails, and the record is spooled.
        with dbapi_conn.cursor() as cur:
            cur.execute(f"SET statement_timeout = {int(PG_STATEMENT_TIMEOUT_S * 1000)}")
        dbapi_conn.commit()

    return engine


def sqlite_sync() -> str:
    """``CXR_AUDIT_SYNC``: ``normal`` (default) or ``full`` (see the module docstring)."""
    value = os.environ.get("CXR_AUDIT_SYNC", "normal").strip().upper() or "NORMAL"
    if value not in SQLITE_SYNC:
        raise ConfigError(f"CXR_AUDIT_SYNC={value.lower()!r} is not valid; choose normal or full")
    return value


def _sqlite_settings(engine: Engine) -> None:
    sync = sqlite_sync()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own transaction handling is switched off: SQLAlchemy's "begin" event
        # below emits BEGIN itself (the documented recipe for SQLite transactions).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={sync}")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        deferred = conn.get_execution_options().get("sqlite_deferred", False)
        conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


# ---------------------------------------------------------------- migrations


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_alembic_config()).get_current_head())


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None: no schema yet)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect().execution_options(sqlite_deferred=True) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (one transaction, under a lock)."""
    from alembic import command

    with engine.connect() as conn:
        command.upgrade(_alembic_config(conn), revision)
        conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base``: drop the whole schema)."""
    from alembic import command

    with engine.connect() as conn:
        command.downgrade(_alembic_config(conn), revision)
        conn.commit()


def ensure_schema(engine: Engine) -> str:
    """Upgrade the database to this version's head when it is behind; returns the head.

    Raises :class:`AuditSchemaError` when the database is at a revision this version does not
    know (written by a newer CXR Insight)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    head = str(script.get_current_head())
    current = current_revision(engine)
    if current == head:
        return head
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise AuditSchemaError(
            f"The audit database {describe(str(engine.url))} is at schema revision {current}, "
            f"which this version of CXR Insight does not know (its newest is {head}). Upgrade "
            "CXR Insight, or point CXR_DB_URL at another database.")
    log.info("Upgrading the audit database schema from %s to %s", current or "empty", head)
    upgrade(engine, head)
    return head
