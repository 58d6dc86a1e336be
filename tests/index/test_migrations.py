"""The Alembic migrations build exactly the schema the models describe, and run twice safely."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from node.index.db import make_engine, migrate
from node.index.models import Base


def test_migrations_match_models(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    migrate(engine)  # idempotent: a restart runs it again
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
