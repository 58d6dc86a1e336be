"""End-to-end tests: each starts real processes (a node, Orthanc, DCMTK peers, the CLI, other Python
environments) and waits on them. Every test below this folder carries the ``e2e`` marker, so
``python3 -m pytest -m "not e2e"`` runs the fast unit tests alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import TEST_PLUGINS

HERE = Path(__file__).resolve().parent
# The test plugins stay beside the unit tests that use them too; tests here import their messages.
sys.path.insert(0, str(TEST_PLUGINS))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Runs before -m deselects (a conftest hook sees the whole session's items: keep to this folder's).
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
