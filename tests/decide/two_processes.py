"""Several node "processes" on one index and one data directory, inside one test process.

Each :class:`Proc` has what a node process brings to the index: its own engines (connections), its own
index writer and receive path, its own series tracker and its own registration (node.index.cluster).
They share only what processes share: the database and the files. Used by the tests of what must happen
once across processes (tests/decide/test_tracker_cluster.py, tests/storage/test_retention_duty.py), on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.ingest import receive
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from node import audit
from node.config import Config
from node.decide.compile import load_checked_config
from node.decide.tracker import SeriesTracker
from node.index.cluster import RUN_DIR, Membership
from node.index.db import make_engine, migrate
from node.index.models import Job, Series, SeriesRevision
from node.index.writer import IndexWriter
from node.receive.ingest import Ingest
from node.storage import Storage

#: The lease (the configuration's minimum) and the quiet period: a series is adopted 1 + 3 s after its last instance.
LEASE = 3
STABLE_AFTER = 1

CONFIG = """
[node]
data_dir = "{data_dir}"
lease = {lease}

[database]
url = "{url}"

[tracker]
stable_after = {stable_after}
use_expected_counts = false

[retention]
enabled = true
interval = 10
sources = {{ max_age_days = 30 }}

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
"""

#: Every CT or MR revision makes a forward job (left pending: no job runner here).
RULES = """
[[rules]]
name = "ct"
on_revision = "rerun"
match = { Modality = "CT" }
actions = [{ type = "forward", to = ["pacs"] }]

[[rules]]
name = "mr"
on_revision = "rerun"
match = { Modality = "MR" }
actions = [{ type = "forward", to = ["pacs"] }]
"""


@dataclass
class Proc:
    """One node process: its engines, receive path, tracker and registration."""

    cfg: Config
    storage: Storage
    engine: Engine
    reader: Engine
    writer: IndexWriter
    tracker: SeriesTracker
    membership: Membership
    ingest: Ingest
    stops: list[Callable[[], None]] = field(default_factory=list)

    def receive(self, path: Path) -> None:
        receive(self.storage, self.ingest, path)

    def stop(self) -> None:
        """Stop what runs, newest first (a stop of something already stopped is skipped)."""
        while self.stops:
            self.stops.pop()()


class Cluster:
    """Processes on one database (``url``; empty: SQLite in the data directory)."""

    def __init__(self, tmp_path: Path, url: str, *, rules: bool = True) -> None:
        config = tmp_path / "node.toml"
        text = CONFIG.format(data_dir=tmp_path / "data", url=url, lease=LEASE, stable_after=STABLE_AFTER)
        config.write_text(text + (RULES if rules else ""))
        self.cfg = load_checked_config(config, environ={})
        self.storage = Storage(self.cfg.data_dir)
        self.storage.prepare()
        self.engine = make_engine(self.cfg.database_url)
        migrate(self.engine)
        self.procs: list[Proc] = []

    def process(
        self,
        *,
        tracker: type[SeriesTracker] = SeriesTracker,
        start: bool = True,
        told: bool = True,
        beat: bool = False,
    ) -> Proc:
        """A new process. ``start``: its tracker runs; ``told``: its receive path tells its tracker of
        arrivals (a process that died right after indexing tells nobody); ``beat``: its heartbeat runs,
        and with it the tracker's sweep (as node.app wires it)."""
        engine = make_engine(self.cfg.database_url)
        reader = make_engine(self.cfg.database_url, write=False)
        writer = IndexWriter(engine)
        t = tracker(self.cfg, engine, reader=reader)
        membership = Membership(engine, self.cfg.data_dir / RUN_DIR, lease=LEASE)
        ingest = Ingest(self.storage, writer, on_recorded=t.arrived if told else None)
        p = Proc(self.cfg, self.storage, engine, reader, writer, t, membership, ingest)
        p.stops += [engine.dispose, reader.dispose]
        membership.register()
        p.stops.append(lambda: membership.stop(clean=True))
        writer.start()
        p.stops.append(writer.stop)
        if start:
            t.start()
            p.stops.append(t.stop)
        if beat:
            membership.on_beat.append(t.sweep)
            membership.start()
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.engine.dispose()

    # -- what the index says ------------------------------------------------------------------------

    def series_states(self) -> dict[str, tuple[str, int]]:
        """{modality: (state, revision)}."""
        with self.engine.connect() as c:
            return {m: (s, r) for m, s, r in c.execute(select(Series.modality, Series.state, Series.revision))}

    def revisions(self) -> list[SeriesRevision]:
        with Session(self.engine) as s:
            rows = list(s.scalars(select(SeriesRevision).order_by(SeriesRevision.series_fk, SeriesRevision.revision)))
            s.expunge_all()
            return rows

    def triggered(self) -> int:
        return sum(1 for r in self.revisions() if r.triggered_at is not None)

    def jobs(self) -> list[tuple[str, int, str]]:
        """(modality, revision, rule) of every job, sorted."""
        with self.engine.connect() as c:
            rows = c.execute(select(Series.modality, Job.revision, Job.rule).join(Series, Series.id == Job.series_fk))
            return sorted((m, rev, rule) for m, rev, rule in rows)

    def series_count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(Series)).scalar_one())

    def audited(self, kind: str) -> int:
        return audit.count(self.engine, kind=kind)


#: The databases every test here runs on (a fixture's params).
DATABASES = ["sqlite", "postgresql"]


def clusters(request: pytest.FixtureRequest, tmp_path: Path, *, rules: bool = True) -> Iterator[Cluster]:
    """A fixture's body: processes on one SQLite file or one new PostgreSQL database (``request.param``)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    c = Cluster(tmp_path, url, rules=rules)
    try:
        yield c
    finally:
        c.stop()
