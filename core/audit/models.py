"""The audit log's tables (SQLAlchemy 2 declarative models).

``audit_records``: one row per prediction or refusal. Never the image, a file name or a DICOM
patient field: the input is identified by the SHA-256 of its bytes, its format and its pixel
size only. ``audit_incidents``: what happened to records that could not be written at once
(replayed late from the spool, or rejected), so that a gap in the log is itself on the log.

The schema is created and changed only by the Alembic migrations in ``migrations/versions``
(a test checks that they produce exactly these tables); edit both together.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

KINDS = ("prediction", "refusal")
SOURCES = ("app", "cli", "api")
INCIDENT_KINDS = ("replayed", "rejected")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A UTC time stored without a zone (SQLite keeps none) and read back as aware UTC."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("audit times must be timezone-aware (UTC)")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Record(Base):
    """One prediction (``kind='prediction'``) or refusal (``kind='refusal'``)."""

    __tablename__ = "audit_records"

    id: Mapped[str] = mapped_column(String(32), primary_key=True,
                                    comment="made by the writer: a retried write never duplicates")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    source: Mapped[str] = mapped_column(String(8), nullable=False, comment="app, cli or api")
    session_id: Mapped[str | None] = mapped_column(String(64), comment="per browser tab or batch")
    user_name: Mapped[str | None] = mapped_column(String(255), comment="signed-in user, if any")
    # the model that answered
    run_id: Mapped[str | None] = mapped_column(String(255))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    calibration_sha256: Mapped[str | None] = mapped_column(String(64))
    statistics_sha256: Mapped[str | None] = mapped_column(String(64))
    runtime: Mapped[str | None] = mapped_column(String(64))
    precision: Mapped[str | None] = mapped_column(String(16))
    # the input: never the image, its file name or a DICOM field
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    input_format: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # the answer
    predicted_class: Mapped[str | None] = mapped_column(String(64))
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON, comment="calibrated")
    confidence: Mapped[float | None] = mapped_column(Float)
    decision: Mapped[str | None] = mapped_column(String(64), comment="at the operating point")
    operating_class: Mapped[str | None] = mapped_column(String(64))
    threshold: Mapped[float | None] = mapped_column(Float)
    low_confidence: Mapped[bool | None] = mapped_column(Boolean)
    ood: Mapped[bool | None] = mapped_column(Boolean)
    ood_score: Mapped[float | None] = mapped_column(Float)
    lung_focus: Mapped[float | None] = mapped_column(Float, comment="where a heatmap was made")
    # a refusal
    error_class: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text, comment="file names scrubbed")

    __table_args__ = (
        Index("ix_audit_records_created_at", "created_at"),
        Index("ix_audit_records_run_created", "run_id", "created_at"),
        Index("ix_audit_records_input_sha256", "input_sha256"),
    )


class Incident(Base):
    """Records written late (replayed from the spool) or rejected by the database."""

    __tablename__ = "audit_incidents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, comment="replayed or rejected")
    count: Mapped[int] = mapped_column(Integer, nullable=False)
    first_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(),
                                                         comment="oldest record concerned")
    last_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(),
                                                        comment="newest record concerned")
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_audit_incidents_created_at", "created_at"),)


records = Record.__table__
incidents = Incident.__table__
