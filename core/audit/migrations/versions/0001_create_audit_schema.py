"""Create the audit log's schema: audit_records and audit_incidents.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("id", sa.String(32), primary_key=True,
                  comment="made by the writer: a retried write never duplicates"),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(8), nullable=False, comment="app, cli or api"),
        sa.Column("session_id", sa.String(64), comment="per browser tab or batch"),
        sa.Column("user_name", sa.String(255), comment="signed-in user, if any"),
        sa.Column("run_id", sa.String(255)),
        sa.Column("weights_sha256", sa.String(64)),
        sa.Column("calibration_sha256", sa.String(64)),
        sa.Column("statistics_sha256", sa.String(64)),
        sa.Column("runtime", sa.String(64)),
        sa.Column("precision", sa.String(16)),
        sa.Column("input_sha256", sa.String(64)),
        sa.Column("input_format", sa.String(16)),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("predicted_class", sa.String(64)),
        sa.Column("probabilities", sa.JSON, comment="calibrated"),
        sa.Column("confidence", sa.Float),
        sa.Column("decision", sa.String(64), comment="at the operating point"),
        sa.Column("operating_class", sa.String(64)),
        sa.Column("threshold", sa.Float),
        sa.Column("low_confidence", sa.Boolean),
        sa.Column("ood", sa.Boolean),
        sa.Column("ood_score", sa.Float),
        sa.Column("lung_focus", sa.Float, comment="where a heatmap was made"),
        sa.Column("error_class", sa.String(64)),
        sa.Column("error_message", sa.Text, comment="file names scrubbed"),
    )
    op.create_index("ix_audit_records_created_at", "audit_records", ["created_at"])
    op.create_index("ix_audit_records_run_created", "audit_records", ["run_id", "created_at"])
    op.create_index("ix_audit_records_input_sha256", "audit_records", ["input_sha256"])
    op.create_table(
        "audit_incidents",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, comment="replayed or rejected"),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=False), comment="oldest record concerned"),
        sa.Column("last_at", sa.DateTime(timezone=False), comment="newest record concerned"),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_audit_incidents_created_at", "audit_incidents", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_incidents_created_at", table_name="audit_incidents")
    op.drop_table("audit_incidents")
    op.drop_index("ix_audit_records_input_sha256", table_name="audit_records")
    op.drop_index("ix_audit_records_run_created", table_name="audit_records")
    op.drop_index("ix_audit_records_created_at", table_name="audit_records")
    op.drop_table("audit_records")
