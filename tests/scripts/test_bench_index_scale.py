"""scripts/bench/bench_index_scale.py: its pre-filled index is one the node's schema of today accepts.

The fill inserts rows straight into the migrated schema; a migration that adds a column must not break it
(it did once: the study table's study-rule columns made the fill fail before any figure was measured).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts" / "bench"))

import bench_index_scale  # noqa: E402


def test_the_benchmark_fills_an_index_of_the_current_schema(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    counts = bench_index_scale.fill_index(db, rows=450, per_study=200, per_series=50)
    assert counts["study"] == 3 and counts["series"] == 9 and counts["instance"] == 450
    con = sqlite3.connect(db)
    try:  # the rows read as the node's own: series triggered at revision 1, no study rule due or waiting
        assert con.execute("SELECT DISTINCT state, revision FROM series").fetchall() == [("triggered", 1)]
        waiting = "SELECT count(*) FROM study WHERE study_rules_due IS NULL AND study_rules_waiting = ''"
        assert con.execute(waiting).fetchone() == (3,)
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        con.close()
