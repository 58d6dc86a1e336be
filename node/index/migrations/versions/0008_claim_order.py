"""indexes in the order jobs and deliveries are claimed

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 13:10:00.000000

A claim takes the most urgent due rows (priority, then queue order). Without an index in that order
every claim sorted the whole due queue: 20 ms at 20,000 pending jobs, 70 ms at 50,000 queued
deliveries for one destination (a PACS down for hours), for each batch of each sender of each process.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_job_claim_order", "job", ["state", sa.text("priority DESC"), "id"])
    op.create_index("ix_delivery_claim_order", "delivery", ["destination", "state", sa.text("priority DESC"), "id"])


def downgrade() -> None:
    op.drop_index("ix_delivery_claim_order", table_name="delivery")
    op.drop_index("ix_job_claim_order", table_name="job")
