"""job.run: an operator's rerun of a job (or of a series' rules) is a job row of its own

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 18:35:00.000000

A job was unique per (series, revision, rule, action index): "exactly once" per revision. A rerun asked
for by an operator (dicom-node jobs rerun, series rerun-rules, the dashboard) is a new row with the next
``run`` for the same match, so the earlier run keeps its state, result, plugin versions and outputs
(lineage shows both). Existing jobs are run 1. A downgrade folds each match's runs into its first
(:func:`_fold_runs`): what the reruns made stays, named as the first run's.
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


#: The first run of job ``{ref}``'s match (the run that stays when the runs are folded into one).
_FIRST_RUN = (
    "(SELECT f.id FROM job f JOIN job r ON f.series_fk = r.series_fk AND f.revision = r.revision"
    " AND f.rule = r.rule AND f.action_index = r.action_index WHERE r.id = {ref} ORDER BY f.run LIMIT 1)"
)


def _fold_runs() -> None:
    """Before 0012 a match had one job: keep each match's first run, and hand it what the later runs made.

    The outputs (instance.job_fk), deliveries and prior retrievals of a rerun name the first run
    instead, so no output, delivery history or prior is lost (nor a foreign key broken); of two prior
    retrievals of one study for one match, one row stays. The later runs' own state and result go.
    """
    later = "SELECT id FROM job WHERE run > 1"
    op.execute(
        "DELETE FROM prior_fetch WHERE job_fk IN (" + later + ") AND EXISTS (SELECT 1 FROM prior_fetch o"
        " WHERE o.study_uid = prior_fetch.study_uid AND o.id <> prior_fetch.id"
        f" AND {_FIRST_RUN.format(ref='o.job_fk')} = {_FIRST_RUN.format(ref='prior_fetch.job_fk')}"
        " AND (o.job_fk NOT IN (" + later + ") OR o.id < prior_fetch.id))"
    )
    for table in ("instance", "delivery", "prior_fetch"):
        op.execute(f"UPDATE {table} SET job_fk = {_FIRST_RUN.format(ref=table + '.job_fk')} WHERE job_fk IN ({later})")
    op.execute(f"DELETE FROM job WHERE id <> {_FIRST_RUN.format(ref='job.id')}")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_job_claim_order")
    _fold_runs()
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_constraint("uq_job_match", type_="unique")
        batch_op.create_unique_constraint("uq_job_match", ["series_fk", "revision", "rule", "action_index"])
        batch_op.drop_column("run")
    _claim_order()
