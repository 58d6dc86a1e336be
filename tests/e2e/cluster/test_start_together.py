"""Two node processes started at the same moment on an empty index both come up and both work.

Both migrate the empty database at once (PostgreSQL, or SQLite in the one data directory they share):
one must wait for the other's migration instead of dying on a duplicate ``alembic_version`` row or a
table that already exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from cluster_peers import CLUSTER_GROUP, Cluster, assert_stored, send
from helpers import make_ct_series, read_sop_uid

from node.index.db import alembic_config

pytestmark = CLUSTER_GROUP


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_two_processes_starting_together_on_an_empty_index_both_come_up(
    make_cluster, request: pytest.FixtureRequest, dialect: str, tmp_path: Path
):
    url = request.getfixturevalue("postgres_url") if dialect == "postgresql" else ""
    cluster: Cluster = make_cluster(url, count=2)
    cluster.start()  # both started before either is waited for; each must answer C-ECHO

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert cluster.rows("select version_num from alembic_version") == [(head,)]
    ids = {cluster.process_id(n) for n in cluster.nodes}
    assert len(ids) == 2
    alive = cluster.value("select count(*) from node_process where stopped_at is null")
    assert alive == 2

    # Both store and index: each gets half of a series.
    files = make_ct_series(tmp_path / "ct", 6, rows=16, cols=16)
    for i, n in enumerate(cluster.nodes):
        assert_stored([send(n.port, files[i::2])])
    indexed = {u for (u,) in cluster.rows("select sop_instance_uid from instance")}
    assert indexed == {read_sop_uid(f) for f in files}
