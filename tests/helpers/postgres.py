"""A throwaway PostgreSQL cluster on loopback, started by the tests (Debian's postgresql package)."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from helpers import free_port


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (scripts/test.sh installs the Debian package postgresql)")
    return Path(found[-1]).parent


@contextmanager
def postgres_server(max_connections: int = 200) -> Iterator[str]:
    """Start a cluster; yields the URL of its ``postgres`` database (for making more databases)."""
    bin_dir = _pg_bin()
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    os.chmod(root, 0o777)
    data = root / "data"
    port = free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*as_pg, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_pg,
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "pg.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections={max_connections}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
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
        engine.dispose()
        yield url
    finally:
        subprocess.run(
            [*as_pg, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_url: str, name: str = "") -> str:
    """Create an empty database on the server; returns its URL."""
    name = name or f"node_{secrets.token_hex(4)}"
    engine = create_engine(server_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"create database {name}"))
    finally:
        engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name
