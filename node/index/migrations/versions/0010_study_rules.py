"""study rules: the study_trigger table, the job's link to it, and the study's durable rules timer

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 18:20:00.000000

A study rule (``scope = "study"``) fires once per (study, rule, input revision set): a study_trigger row,
inserted in the transaction that makes its jobs (whose study_trigger_fk names it). study.study_rules_due
is when the study's rules are to be evaluated next, so that a restart (or another node process) picks up
studies whose series triggered while a rule waited; study.study_rules_waiting is what the last evaluation
found each waiting rule waiting for (JSON), for the dashboard.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_trigger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_fk", sa.Integer(), nullable=False),
        sa.Column("rule", sa.String(length=128), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("inputs", sa.Text(), nullable=False),
        sa.Column("inputs_key", sa.String(length=64), nullable=False),
        sa.Column("primary_series_fk", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_fk"], ["study.id"]),
        sa.ForeignKeyConstraint(["primary_series_fk"], ["series.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_fk", "rule", "revision", name="uq_study_trigger_revision"),
        sa.UniqueConstraint("study_fk", "rule", "inputs_key", name="uq_study_trigger_inputs"),
    )
    op.create_index("ix_study_trigger_study_fk", "study_trigger", ["study_fk"])
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("study_trigger_fk", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_job_study_trigger_fk_study_trigger", "study_trigger", ["study_trigger_fk"], ["id"]
        )
        batch_op.create_index("ix_job_study_trigger_fk", ["study_trigger_fk"])
    with op.batch_alter_table("study") as batch_op:
        batch_op.add_column(sa.Column("study_rules_due", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("study_rules_waiting", sa.Text(), nullable=False, server_default=""))
        batch_op.create_index("ix_study_study_rules_due", ["study_rules_due"])


def downgrade() -> None:
    with op.batch_alter_table("study") as batch_op:
        batch_op.drop_index("ix_study_study_rules_due")
        batch_op.drop_column("study_rules_waiting")
        batch_op.drop_column("study_rules_due")
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_index("ix_job_study_trigger_fk")
        batch_op.drop_constraint("fk_job_study_trigger_fk_study_trigger", type_="foreignkey")
        batch_op.drop_column("study_trigger_fk")
    op.drop_index("ix_study_trigger_study_fk", table_name="study_trigger")
    op.drop_table("study_trigger")
