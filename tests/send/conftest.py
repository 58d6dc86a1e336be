"""The ``index`` fixture of the queue and circuit tests (the Index it yields: queue_index.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from queue_index import Index

from node.index.db import make_engine, migrate


@pytest.fixture
def index(any_index_url: str, tmp_path: Path) -> Iterator[Index]:
    """A new migrated index on SQLite, then on PostgreSQL."""
    (tmp_path / "data").mkdir()
    url = any_index_url
    engine = make_engine(url)
    migrate(engine)
    ix = Index(url, engine, tmp_path)
    try:
        yield ix
    finally:
        for e in ix.engines:
            e.dispose()
        engine.dispose()
