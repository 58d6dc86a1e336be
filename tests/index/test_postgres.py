"""The same node on PostgreSQL: a throwaway cluster started by the test, on loopback."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import dataset_bytes, free_port, make_ct_series, storescu
from sqlalchemy import create_engine, text


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (scripts/test.sh installs the Debian package postgresql)")
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def postgres_url():
    bin_dir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    os.chmod(root, 0o777)
    data = root / "data"
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(
        [*as_pg, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-t", "60",
         "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=on", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        engine = create_engine(url)
        deadline = time.monotonic() + 30
        while True:
            try:
                with engine.connect() as c:
                    c.execute(text("select 1"))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("create database dicom_node"))
        engine.dispose()
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/dicom_node"
    finally:
        subprocess.run([*as_pg, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def test_node_on_postgresql(node, tmp_path, postgres_url):
    files = make_ct_series(tmp_path / "a", 40) + make_ct_series(tmp_path / "b", 40)
    node.env = {"DICOM_NODE_DATABASE__URL": postgres_url}
    node.start()
    procs = [storescu(node.port, files[:40]), storescu(node.port, files[40:])]
    assert all(p.returncode == 0 for p in procs)
    # Duplicates stay single rows on PostgreSQL too.
    assert storescu(node.port, files[:5]).returncode == 0
    node.stop()
    engine = create_engine(postgres_url)
    with engine.connect() as c:
        rows = dict(c.execute(text("select sop_instance_uid, file_path from instance")).all())
        counts = c.execute(text("select instance_count from series order by id")).scalars().all()
        version = c.execute(text("select version_num from alembic_version")).scalar()
    engine.dispose()
    assert len(rows) == 80 and counts == [40, 40]
    assert version == "0002"
    from helpers import read_sop_uid

    for f in files:
        assert dataset_bytes(node.data_dir / rows[read_sop_uid(f)]) == dataset_bytes(f)
    # Restart on the same database: migrations are idempotent, recovery finds nothing to do.
    node.start()
    assert "Traceback" not in node.log()
