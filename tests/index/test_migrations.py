"""The Alembic migrations build exactly the schema the models describe, and run twice safely."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from node.index.db import make_engine, migrate
from node.index.models import Base

#: Indexes with a DESC column or an expression: Alembic cannot compare expression indexes (it reports them
#: as removed and added again); they are checked by name below instead.
DESC_INDEXES = {"ix_job_claim_order": "job", "ix_delivery_claim_order": "delivery", "ix_patient_name_lower": "patient"}


def _comparable(obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
    return not (type_ == "index" and name in DESC_INDEXES)


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_migrations_match_models(any_index_url: str) -> None:
    engine = make_engine(any_index_url)
    migrate(engine)
    migrate(engine)  # idempotent: a restart runs it again
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_object": _comparable})
        assert compare_metadata(ctx, Base.metadata) == []
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    # From the catalogue: SQLAlchemy does not reflect SQLite's expression indexes.
    catalogue = (
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'"
        if engine.dialect.name == "sqlite"
        else "SELECT indexname, tablename FROM pg_indexes"
    )
    with engine.connect() as conn:
        found = {name: table for name, table in conn.exec_driver_sql(catalogue) if name in DESC_INDEXES}
        if engine.dialect.name == "postgresql":
            definition = conn.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_patient_name_lower'"
            ).scalar_one()
            assert "text_pattern_ops" in definition  # serves LIKE 'doe%' whatever the collation
    assert found == DESC_INDEXES
    engine.dispose()
