"""priors: the prior_fetch table (prior studies a job asked a [[sources]] PACS for)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 18:30:00.000000

A row is written before the node retrieves a study (C-MOVE or C-GET), so that the series tracker knows
the arriving series are priors: they are indexed, but no rule is evaluated for them (never forwarded,
no job of their own), and retention keeps them per [retention] priors. ``owner`` is the node process
whose retrieve pool runs the retrieve (state ``retrieving``): a row whose process is gone is retried.
``job.waiting_since``: when the job first waited for its source (the priors timeout counts from it).
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prior_fetch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_fk", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=128), nullable=False),
        sa.Column("study_date", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("expected", sa.Integer(), nullable=True),
        sa.Column("received", sa.Integer(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["job_fk"], ["job.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_fk", "study_uid", name="uq_prior_fetch_job_study"),
    )
    op.create_index("ix_prior_fetch_job_fk", "prior_fetch", ["job_fk"])
    op.create_index("ix_prior_fetch_study_uid", "prior_fetch", ["study_uid"])
    op.add_column("job", sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("waiting_since")
    op.drop_index("ix_prior_fetch_study_uid", table_name="prior_fetch")
    op.drop_index("ix_prior_fetch_job_fk", table_name="prior_fetch")
    op.drop_table("prior_fetch")
