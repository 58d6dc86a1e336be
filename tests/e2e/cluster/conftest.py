"""Fixtures of the cluster tests: clusters of node processes, and a PACS that counts every copy it receives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_peers import Cluster, CountingSCP, GatedProxy


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Any]:
    """Makes clusters (``make_cluster(url, extra_config=..., env=...)``); stops them after the test and fails
    it on a traceback in any node's log."""
    made: list[Cluster] = []

    def make(url: str, **kw: Any) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", url, **kw)
        c.make()
        made.append(c)
        return c

    yield make
    problems = [p for c in made for p in c.stop()]
    assert not problems, "\n\n".join(problems)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[CountingSCP]:
    scp = CountingSCP(tmp_path / "pacs", ae_title="PACS").start()
    yield scp
    scp.stop()


@pytest.fixture
def gated_pacs(pacs: CountingSCP) -> Iterator[GatedProxy]:
    proxy = GatedProxy(pacs.port)
    yield proxy
    proxy.stop()
