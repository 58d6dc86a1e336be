"""Retention with several node processes on one index, on SQLite and on PostgreSQL.

The scheduled clean-up runs in one process only, the holder of the duty ``retention``; when that
process stops, another takes the schedule up. An operator's run (``dicom-node retention``) still
works anywhere and says which process holds the duty. Series are made "old" by moving their last
arrival back in the index (what a month of waiting would do); everything else is real: the receive
path, the series tracker making them ``triggered``, the scheduler, the deletions.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from decide.two_processes import DATABASES, Cluster, Proc, clusters
from helpers import series_files, wait_for
from sqlalchemy import update

from node.index.models import Series, utcnow
from node.storage import retention
from node.storage.retention import Retention

CT = "ct-head-philips-5mm"
MR = "mr-t1-sag-siemens"


@pytest.fixture(params=DATABASES)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """No rules: a series the rules have evaluated and that has no job is the clean-up's to delete."""
    yield from clusters(request, tmp_path, rules=False)


def receive_old(cluster: Cluster, p: Proc, files: list[Path], modality: str) -> None:
    """Receive a series, let its rules fire, then date its last arrival 40 days back (due by age)."""
    for path in files:
        p.receive(path)
    wait_for(lambda: cluster.series_states().get(modality, ("",))[0] == "triggered", 15, f"the {modality} series")
    with cluster.engine.begin() as c:
        c.execute(
            update(Series).where(Series.modality == modality).values(last_received_at=utcnow() - dt.timedelta(days=40))
        )


def test_the_scheduled_clean_up_runs_in_one_process_and_another_takes_it_up(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.storage.retention")
    monkeypatch.setattr(retention, "FIRST_RUN_DELAY", 0.2)  # both first runs at once (the interval is 10 s)
    a, b = cluster.process(beat=True), cluster.process(beat=True)
    receive_old(cluster, a, series_files(CT)[:2], "CT")
    cleanups = {
        p.membership.id: Retention(cluster.cfg, p.engine, p.storage, reader=p.reader, owner=p.membership.id)
        for p in (a, b)
    }
    for r in cleanups.values():
        r.start()
    try:

        def ran() -> list[str]:
            return [pid for pid, r in cleanups.items() if r.last_report is not None]

        wait_for(ran, 15, "a scheduled run")
        wait_for(lambda: "runs in node process" in caplog.text, 10, "the other process's scheduled run")
        assert cluster.series_count() == 0
        assert len(ran()) == 1, ran()  # one scheduled run, in one process
        [holder] = ran()
        report = cleanups[holder].last_report
        assert report is not None and report.series == 1 and report.errors == []
        assert f"runs in node process {holder}" in caplog.text
        assert cluster.audited("series_deleted") == 1

        # An operator's run works in any process (here: none, as the command line) and names the holder.
        manual = Retention(cluster.cfg, cluster.engine, cluster.storage).run_once(actor="operator")
        assert manual.series == 0 and manual.errors == []
        assert f"node process {holder} holds the retention duty" in caplog.text

        # The holder stops (cleanly: its duty is released); the other's next scheduled run is its own.
        [other] = [pid for pid in cleanups if pid != holder]
        stopping = a if a.membership.id == holder else b
        cleanups[holder].stop()
        stopping.stop()
        staying = b if stopping is a else a
        receive_old(cluster, staying, series_files(MR)[:2], "MR")
        cleanups[other]._scheduler.modify_job("retention", next_run_time=dt.datetime.now(dt.UTC))
        wait_for(lambda: cleanups[other].last_report, 15, "the other process's scheduled run")
        last = cleanups[other].last_report
        assert cluster.series_count() == 0
        assert last is not None and last.series == 1 and last.errors == []
        assert cluster.audited("series_deleted") == 2
    finally:
        for r in cleanups.values():
            r.stop()
