"""The prediction audit log: every prediction and refusal traceable afterwards, without the
image, a file name or any patient field.

* :mod:`core.audit.models`: the tables (SQLAlchemy 2); :mod:`core.audit.engine`: where the
  database lives (SQLite in the user's data folder by default, PostgreSQL through
  ``CXR_DB_URL``), WAL mode, Alembic migrations (``migrations/``) applied on first use;
* :mod:`core.audit.log`: :class:`AuditLog` (``record_prediction``, ``record_refusal``),
  committed before the prediction is returned, spooled to a local file when the database is
  down; ``CXR_AUDIT=0`` turns it off;
* :mod:`core.audit.query`: filters, counts per day and class, drift, CSV, statistics, purge;
* ``python -m core.audit {stats,export,purge,replay,upgrade,downgrade,current,bench}``.
"""

from core.audit.engine import AuditSchemaError, data_dir, default_url
from core.audit.log import (
    AuditLog,
    AuditResult,
    AuditStatus,
    Health,
    ModelIdentity,
    audit_enabled,
    describe_input,
    new_session_id,
    scrub,
    sniff_format,
)
from core.audit.query import Filters

__all__ = ["AuditLog", "AuditResult", "AuditSchemaError", "AuditStatus", "Filters", "Health",
           "ModelIdentity", "audit_enabled", "data_dir", "default_url", "describe_input",
           "new_session_id", "scrub", "sniff_format"]
