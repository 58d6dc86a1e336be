"""Fixtures: a node started per test (or per module) and checks that real peers exist."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHARED, NodeProcess  # noqa: E402

# Every node a test starts serves its web port on a free port of its own, never on the default 8080,
# unless the test sets one (NodeProcess does, so that tests can reach it).
os.environ.setdefault("DICOM_NODE_WEB__PORT", "0")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"shared data: {SHARED}", f"storescu: {shutil.which('storescu', path='/usr/bin')}"]


#: Fixtures that change something every test process shares, and the xdist group their tests run in
#: (``--dist loadgroup`` in pyproject's addopts sends a group to one worker, one test after another).
SHARED_STATE_GROUPS = {
    # builds and tags the container plugins' test image, and lists every container podman has.
    "test_image": "podman",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests whose fixtures touch state shared between processes run in one xdist worker (see above)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, group in SHARED_STATE_GROUPS.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def node(tmp_path: Path):
    """A fresh node with its own data directory; stopped (and its log shown on failure) afterwards."""
    n = NodeProcess(tmp_path / "node")
    yield n
    code = n.stop()
    assert "Traceback" not in n.log(), n.log()[-4000:]
    assert code in (0, -9, None), f"node exited with {code}\n{n.log()[-4000:]}"


@pytest.fixture(scope="module")
def module_orthanc(tmp_path_factory: pytest.TempPathFactory):
    """A real Orthanc (Debian's package) shared by one test module's tests."""
    from helpers.orthanc import Orthanc

    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared test data folder {SHARED} is missing")
    return SHARED


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL cluster per test process, started on first use (``postgres_url`` makes databases in it)."""
    from helpers.postgres import postgres_server as start

    with start() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server):
    """A new, empty PostgreSQL database for this test."""
    from helpers.postgres import new_database

    return new_database(postgres_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty index (not migrated): a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))
