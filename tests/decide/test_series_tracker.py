"""The series tracker on its own (node.decide.tracker): no node process, no network.

Real CT slices go through the real receive path (Ingest on a migrated SQLite index, wired to the
tracker as node.app wires it); the tracker's own scheduler decides. What a user relies on: a series is
stable only after its quiet period, or as soon as the expected count arrived; its rules then make
jobs once; an instance after that opens the next revision, which is tracked and triggered again.
(tests/e2e/decide/test_tracker.py covers the same through a node process with DCMTK.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import series_files, wait_for
from helpers.ingest import receive
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.decide.compile import load_checked_config
from node.decide.tracker import SeriesTracker
from node.index.db import make_engine, migrate
from node.index.models import Job, Series, SeriesRevision
from node.index.writer import IndexWriter
from node.receive.ingest import Ingest
from node.storage import Storage

CT = "ct-head-philips-5mm"

CONFIG = """
[node]
data_dir = "{data_dir}"

[tracker]
stable_after = {stable_after}
use_expected_counts = false

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[rules]]
name = "ct"
on_revision = "rerun"
{rule_extra}
match = {{ Modality = "CT" }}
actions = [{{ type = "forward", to = ["pacs"] }}]
"""


@dataclass
class Tracked:
    engine: Engine
    storage: Storage
    ingest: Ingest
    jobs_woken: list[bool]

    def receive(self, path: Path) -> None:
        receive(self.storage, self.ingest, path)

    def series(self) -> Series:
        with Session(self.engine) as s:
            [row] = s.scalars(select(Series)).all()
            s.expunge(row)
            return row

    def revisions(self) -> list[SeriesRevision]:
        with Session(self.engine) as s:
            rows = list(s.scalars(select(SeriesRevision).order_by(SeriesRevision.revision)).all())
            s.expunge_all()
            return rows

    def jobs(self) -> list[tuple[int, str, str]]:
        with Session(self.engine) as s:
            return list(s.execute(select(Job.revision, Job.rule, Job.kind).order_by(Job.id)).all())

    def triggered(self, revisions: int) -> bool:
        return len([r for r in self.revisions() if r.triggered_at is not None]) == revisions


def _tracked(tmp_path: Path, stable_after: float, rule_extra: str = "") -> Iterator[Tracked]:
    data_dir = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(CONFIG.format(data_dir=data_dir, stable_after=stable_after, rule_extra=rule_extra))
    cfg = load_checked_config(config, environ={})
    storage = Storage(cfg.data_dir)
    storage.prepare()
    engine = make_engine(cfg.database_url)
    migrate(engine)
    writer = IndexWriter(engine)
    writer.start()
    woken: list[bool] = []
    tracker = SeriesTracker(cfg, engine, on_jobs=lambda: woken.append(True))
    tracker.start()
    try:
        yield Tracked(engine, storage, Ingest(storage, writer, on_recorded=tracker.arrived), woken)
    finally:
        tracker.stop()
        writer.stop()
        engine.dispose()


@pytest.fixture
def quiet(tmp_path: Path) -> Iterator[Tracked]:
    """Stable after 1 s without an instance (long enough that three fsynced arrivals fit in it)."""
    yield from _tracked(tmp_path, 1)


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[Tracked]:
    """Stable after an hour of quiet, or as soon as 3 instances arrived (the rule says so)."""
    yield from _tracked(tmp_path, 3600, "expected_instances = 3")


def _elapsed(later: dt.datetime, earlier: dt.datetime) -> float:
    return (later - earlier).total_seconds()


def test_a_series_becomes_stable_after_its_quiet_period_and_triggers_its_rule_once(quiet: Tracked) -> None:
    for path in series_files(CT)[:3]:
        quiet.receive(path)
    assert quiet.series().state == "receiving"  # not before its quiet period

    wait_for(lambda: quiet.triggered(1), 10, "the series to be triggered")

    [rev] = quiet.revisions()
    assert (rev.revision, rev.instance_count) == (1, 3)
    assert _elapsed(rev.stable_at, rev.last_received_at) >= 1, (rev.stable_at, rev.last_received_at)
    assert rev.stable_reason == "no instance for 1 s"
    assert rev.matched_rules == "ct" and rev.error == ""
    assert quiet.series().state == "triggered"
    assert quiet.jobs() == [(1, "ct", "forward")]
    assert quiet.jobs_woken  # the job runner is told at once


def test_a_series_is_stable_as_soon_as_its_expected_count_arrived(counted: Tracked) -> None:
    files = series_files(CT)[:3]
    for path in files[:2]:
        counted.receive(path)
    assert counted.series().state == "receiving"
    counted.receive(files[2])

    wait_for(lambda: counted.triggered(1), 10, "the series to be triggered by its count")

    [rev] = counted.revisions()
    assert rev.instance_count == 3
    assert rev.stable_reason.startswith("3 of 3 expected instances"), rev.stable_reason
    assert counted.jobs() == [(1, "ct", "forward")]


def test_an_instance_after_triggering_opens_the_next_revision(quiet: Tracked) -> None:
    files = series_files(CT)[:3]
    for path in files[:2]:
        quiet.receive(path)
    wait_for(lambda: quiet.triggered(1), 10, "revision 1 to be triggered")

    quiet.receive(files[2])
    series = quiet.series()
    assert (series.state, series.revision, series.revision_instances) == ("receiving", 2, 1)

    wait_for(lambda: quiet.triggered(2), 10, "revision 2 to be triggered")
    assert [(r.revision, r.instance_count) for r in quiet.revisions()] == [(1, 2), (2, 1)]
    assert quiet.jobs() == [(1, "ct", "forward"), (2, "ct", "forward")]  # on_revision = "rerun"
    assert quiet.series().state == "triggered"
