"""job.run: an operator's rerun of a job (or of a series' rules) is a job row of its own

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 18:35:00.000000

A job was unique per (series, revision, rule, action index): "exactly once" per revision. A rerun asked
for by an operator (dicom-node jobs rerun, series rerun-rules, the dashboard) is a new row with the next
``run`` for the same match, so the earlier run keeps its state, result, plugin versions and outputs
(lineage shows both). Existing jobs are run 1.
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _claim_order() -> None:
    """The claim's index (0008): an expression index (priority DESC), which SQLite's batch mode (copying the
    table) cannot carry over, so it is dropped before and made again after."""
    op.create_index("ix_job_claim_order", "job", ["state", sa.text("priority DESC"), "id"])


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_job_claim_order")
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("run", sa.Integer(), nullable=False, server_default="1"))
        batch_op.drop_constraint("uq_job_match", type_="unique")
        batch_op.create_unique_constraint("uq_job_match", ["series_fk", "revision", "rule", "action_index", "run"])
    _claim_order()


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_job_claim_order")
    op.execute("DELETE FROM job WHERE run > 1")
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_constraint("uq_job_match", type_="unique")
        batch_op.create_unique_constraint("uq_job_match", ["series_fk", "revision", "rule", "action_index"])
        batch_op.drop_column("run")
    _claim_order()
