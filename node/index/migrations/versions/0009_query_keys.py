"""Q/R and QIDO-RS query keys: SeriesDate and SeriesTime, and the indexes queries use

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 15:30:00.000000

SeriesDate/SeriesTime are new series keys (series indexed before this revision have them empty: the
node does not reread stored files). study.study_date is indexed for date-range queries (C-FIND and
QIDO-RS over a large index read the matching range instead of the whole study table), and
lower(patient_name) for Person Name matching, which ignores case: an exact name reads the index instead
of every patient; on PostgreSQL with text_pattern_ops, so that a name prefix (``DOE*`` -> LIKE 'doe%')
does too whatever the database's collation.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch_op:
        batch_op.add_column(sa.Column("series_date", sa.String(length=16), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("series_time", sa.String(length=32), nullable=False, server_default=""))
    op.create_index("ix_study_study_date", "study", ["study_date"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE INDEX ix_patient_name_lower ON patient (lower(patient_name) text_pattern_ops)")
    else:
        op.create_index("ix_patient_name_lower", "patient", [sa.text("lower(patient_name)")])


def downgrade() -> None:
    op.drop_index("ix_patient_name_lower", table_name="patient")
    op.drop_index("ix_study_study_date", table_name="study")
    with op.batch_alter_table("series") as batch_op:
        batch_op.drop_column("series_time")
        batch_op.drop_column("series_date")
