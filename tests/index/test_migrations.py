"""The Alembic migrations build exactly the schema the models describe, and run twice safely."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from node.index.db import make_engine, migrate
from node.index.models import Base

#: Indexes with a DESC column: Alembic cannot compare expression indexes (it reports them as removed and
#: added again); they are checked by name and definition below instead.
DESC_INDEXES = {"ix_job_claim_order": "job", "ix_delivery_claim_order": "delivery"}


def _comparable(obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
    return not (type_ == "index" and name in DESC_INDEXES)


def test_migrations_match_models(any_index_url: str) -> None:
    engine = make_engine(any_index_url)
    migrate(engine)
    migrate(engine)  # idempotent: a restart runs it again
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_object": _comparable})
        assert compare_metadata(ctx, Base.metadata) == []
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    found = {
        i["name"]: table
        for table in set(DESC_INDEXES.values())
        for i in inspect(engine).get_indexes(table)
        if i["name"] in DESC_INDEXES
    }
    assert found == DESC_INDEXES
    engine.dispose()
