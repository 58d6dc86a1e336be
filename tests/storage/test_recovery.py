"""Reconciling what a node process left (node.storage.recovery): on its own, and with several processes.

Real files go straight into a data directory's storage with an empty index, as a crash between the
rename and the commit leaves them; node processes are registered in a real index (SQLite), crashed
ones are rows whose lease ran out without a clean stop. Recovery must index the received files as
received series (the rules run on them) and the node's own outputs (UIDs under its derived root) as
not tracked, move what it cannot read to quarantine, and never touch what a live process is still
writing or about to index.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID, generate_uid
from sqlalchemy import Engine, func, insert, select

from node.dicom.identity import DERIVED_UID_ROOT
from node.index.cluster import RUN_DIR, Membership, processes
from node.index.cluster import file_name as scratch_name
from node.index.db import make_engine, migrate
from node.index.models import Instance, NodeProcess, Series, utcnow
from node.index.writer import IndexWriter
from node.storage import Storage
from node.storage.recovery import LEGACY_CLEAN_MARKER, Recovery, RecoveryReport

CT = "transfer-syntaxes/misc/CT_small.dcm"
LEASE = 30.0


@dataclass
class Proc:
    """One node process's view: its registration, its storage and its recovery."""

    membership: Membership
    storage: Storage
    writer: IndexWriter
    recovery: Recovery


class Cluster:
    """Node processes on one data directory and one index, made and stopped by the test."""

    def __init__(self, tmp_path: Path, url: str = "") -> None:
        self.data_dir = tmp_path / "data"
        self.engine: Engine = make_engine(url or f"sqlite:///{tmp_path / 'index.sqlite'}")
        migrate(self.engine)
        self.procs: list[Proc] = []

    def start(self, *, clock: Callable[[], dt.datetime] = utcnow, settle: float = 120.0) -> Proc:
        """A process as Node.start makes it: registered, its directories made, its writer running."""
        m = Membership(self.engine, self.data_dir / RUN_DIR, lease=LEASE)
        m.register()
        storage = Storage(self.data_dir, m.id)
        storage.prepare()
        writer = IndexWriter(self.engine)
        writer.start()
        p = Proc(m, storage, writer, Recovery(storage, writer, m, settle=settle, clock=clock))
        self.procs.append(p)
        return p

    def crashed(self, ago: float, *, name: str = "") -> str:
        """The row of a process on another host whose lease ran out ``ago`` s ago without a clean stop."""
        pid = name or f"elsewhere:1:{generate_uid()[-8:]}"
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                insert(NodeProcess).values(
                    id=pid,
                    host="elsewhere",
                    pid=1,
                    role="node",
                    version="",
                    started_at=now - dt.timedelta(seconds=ago + 600),
                    heartbeat_at=now - dt.timedelta(seconds=ago + LEASE),
                    expires_at=now - dt.timedelta(seconds=ago),
                )
            )
        return pid

    def row(self, pid: str):  # noqa: ANN201 - a ProcessRow
        return next(p for p in processes(self.engine) if p.id == pid)

    def indexed(self) -> dict[str, str]:
        """{SOP Instance UID: file path} of every indexed instance."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(Instance.sop_instance_uid, Instance.file_path)).all())

    def close(self) -> None:
        for p in self.procs:
            p.recovery.stop()
            p.writer.stop()
            p.membership.stop(clean=True)
        self.engine.dispose()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def _place(storage: Storage, source: Path, sop_uid: str | None = None, series_uid: str = "") -> Path:
    """A copy of ``source`` (with new UIDs if given) where the node would have stored it, never indexed."""
    ds = dcmread(source)
    if sop_uid is not None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.SeriesInstanceUID = series_uid or generate_uid()
    final = storage.path_for(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    final.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(final, enforce_file_format=True)
    return final


def _temp_files(storage: Storage, process_id: str) -> list[Path]:
    """Temp files as a process leaves them mid-receive and mid-job."""
    d = storage.tmp_root / scratch_name(process_id)
    (d / "job-7-1").mkdir(parents=True, exist_ok=True)
    files = [d / "rx-1-1.part", d / "job-7-1" / "seg.dcm"]
    for f in files:
        f.write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(200))
    return files


# -- a process starting alone (one node, as always) --------------------------------------------------


def test_received_and_derived_files_are_indexed_and_only_received_series_are_tracked(
    cluster: Cluster, shared_data: Path
) -> None:
    staging = Storage(cluster.data_dir)
    received = _place(staging, shared_data / CT)
    derived_uid = DERIVED_UID_ROOT + "1.2.3"
    derived = _place(staging, shared_data / CT, sop_uid=derived_uid, series_uid=DERIVED_UID_ROOT + "1.2")
    dead = cluster.crashed(ago=0)  # kill -9 just now: alone, the next start reconciles at once
    left = _temp_files(staging, dead)
    time.sleep(0.05)  # coarse file timestamps
    # Stored after the dead process's lease ended: a live process's whose lease lapsed; it indexes it itself.
    late = _place(staging, shared_data / CT, sop_uid=generate_uid())
    a = cluster.start()

    report = a.recovery.at_start()

    assert report.full_scan and report.processes == [dead]
    assert sorted(report.indexed) == sorted([dcmread(received).SOPInstanceUID, derived_uid])
    assert report.quarantined == [] and report.too_recent == 1 and late.is_file()
    assert report.temp_removed == 2 and not any(f.exists() for f in left)
    with cluster.engine.connect() as conn:
        states = dict(
            conn.execute(
                select(Instance.sop_instance_uid, Series.state).join(Series, Instance.series_fk == Series.id)
            ).all()
        )
    assert states[derived_uid] == "triggered", states  # a node's own output: no rule runs on it
    assert states[str(dcmread(received).SOPInstanceUID)] == "receiving", states
    assert derived.is_file() and received.is_file()
    assert cluster.row(dead).recovered_at is not None
    assert a.recovery.at_start().full_scan is False  # reconciled once


def test_an_unreadable_stored_file_goes_to_quarantine_with_the_reason(
    cluster: Cluster, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = _place(Storage(cluster.data_dir), shared_data / CT)
    data = stored.read_bytes()
    stored.write_bytes(data[: len(data) // 10])  # cut inside the header: a torn copy
    dead = cluster.crashed(ago=0)
    a = cluster.start()

    with caplog.at_level("INFO", logger="node.storage.recovery"):
        report = a.recovery.at_start()

    assert report.indexed == [] and len(report.quarantined) == 1
    target = Path(report.quarantined[0])
    assert not stored.exists() and target.is_file() and target.parent == a.storage.quarantine
    assert "unreadable (" in caplog.text and "it is truncated" in caplog.text, caplog.text
    assert f"node process(es) {dead} did not stop cleanly" in caplog.text, caplog.text
    assert cluster.indexed() == {}


def test_after_clean_stops_only_temp_files_go(cluster: Cluster, shared_data: Path) -> None:
    first = cluster.start()
    first.membership.stop(clean=True)
    flat = first.storage.tmp_root / "rx-1-1.part"  # left by an older version: flat under tmp/
    shutil.copy(shared_data / CT, flat)
    unindexed = _place(first.storage, shared_data / CT)

    report = cluster.start().recovery.at_start()

    assert not report.full_scan and report.temp_removed == 1 and not flat.exists()
    assert unindexed.is_file() and cluster.indexed() == {}  # no scan: a clean stop left nothing unindexed


def test_an_older_versions_clean_marker_counts_once_and_its_crash_means_a_scan(
    cluster: Cluster, shared_data: Path
) -> None:
    storage = Storage(cluster.data_dir)
    storage.prepare()
    unindexed = _place(storage, shared_data / CT)
    (storage.root / LEGACY_CLEAN_MARKER).write_text("dicom-node stopped cleanly\n")

    first = cluster.start()
    assert first.recovery.at_start().full_scan is False
    assert not (storage.root / LEGACY_CLEAN_MARKER).exists()
    first.membership.stop(clean=True)
    assert cluster.start().recovery.at_start().full_scan is False  # its clean stop is a row now
    assert cluster.indexed() == {}

    # The same data directory as an older version left it after a crash: no marker, no process rows.
    with cluster.engine.begin() as conn:
        conn.execute(NodeProcess.__table__.delete())
    report = cluster.start().recovery.at_start()
    assert report.full_scan and report.processes == []
    assert cluster.indexed() == {str(dcmread(unindexed).SOPInstanceUID): storage.relative(unindexed)}


# -- processes side by side ------------------------------------------------------------------------


def test_a_start_beside_a_live_process_leaves_its_files_alone(cluster: Cluster, shared_data: Path) -> None:
    b = cluster.start()
    b_temp = _temp_files(b.storage, b.membership.id)
    b_unindexed = _place(b.storage, shared_data / CT)  # renamed into place, its row on its way
    flat = b.storage.tmp_root / "rx-9-9.part"  # whose? an older version's perhaps: not while B lives
    flat.write_bytes(b"partial")
    gone = cluster.start()
    gone.membership.stop(clean=True)
    gone_temp = _temp_files(gone.storage, gone.membership.id)
    dead = cluster.crashed(ago=1)
    dead_temp = _temp_files(b.storage, dead)

    a = cluster.start()
    report = a.recovery.at_start()

    assert all(f.is_file() for f in [*b_temp, b_unindexed, flat]), "a live process's files were touched"
    assert not any(f.exists() for f in [*gone_temp, *dead_temp]), "temp files of processes that are gone stay"
    assert report.temp_removed == 4 and not report.full_scan
    assert cluster.indexed() == {} and cluster.row(dead).recovered_at is None
    assert a.recovery.reconcile_crashed() is None  # the crash is too recent to tell its files from B's
    assert b_unindexed.is_file() and cluster.indexed() == {}


@pytest.mark.parametrize("index", ["sqlite", "postgresql"])
def test_a_crashed_process_is_reconciled_once_by_one_of_two_and_only_its_old_enough_files(
    index: str, tmp_path: Path, request: pytest.FixtureRequest, shared_data: Path
) -> None:
    cluster = Cluster(tmp_path, request.getfixturevalue("postgres_url") if index == "postgresql" else "")
    request.addfinalizer(cluster.close)
    dead = cluster.crashed(ago=300)
    settle = 60.0
    staging = Storage(cluster.data_dir)
    staging.prepare()
    orphan = _place(staging, shared_data / CT)  # the crashed process's: stored, never indexed
    dead_temp = _temp_files(staging, dead)
    time.sleep(0.2)  # coarse file timestamps: the live file below is surely newer
    in_flight = _place(staging, shared_data / CT, sop_uid=generate_uid())  # a live process's, being indexed
    t_orphan, t_live = (max(p.stat().st_mtime, p.stat().st_ctime) for p in (orphan, in_flight))
    assert t_live - t_orphan > 0.1
    # "now" is settle s after a moment between the two files: the orphan is old enough, the other not.
    now = dt.datetime.fromtimestamp((t_orphan + t_live) / 2, dt.UTC) + dt.timedelta(seconds=settle)
    a, b = (cluster.start(clock=lambda: now, settle=settle) for _ in range(2))
    assert not a.recovery.at_start().full_scan and not b.recovery.at_start().full_scan  # not alone

    reports: list[RecoveryReport | None] = []
    go = threading.Barrier(2)

    def sweep(p: Proc) -> None:
        go.wait()
        reports.append(p.recovery.reconcile_crashed())

    threads = [threading.Thread(target=sweep, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    done = [r for r in reports if r is not None]
    assert len(reports) == 2 and len(done) == 1, reports
    report = done[0]
    assert report.processes == [dead] and report.indexed == [str(dcmread(orphan).SOPInstanceUID)]
    assert report.too_recent == 1 and report.quarantined == []
    assert cluster.indexed() == {str(dcmread(orphan).SOPInstanceUID): staging.relative(orphan)}
    assert in_flight.is_file() and not any(f.exists() for f in dead_temp)
    assert cluster.row(dead).recovered_at is not None
    assert a.recovery.reconcile_crashed() is None and b.recovery.reconcile_crashed() is None  # once


def test_the_heartbeat_sweep_reconciles_in_its_own_thread(cluster: Cluster, shared_data: Path) -> None:
    b = cluster.start()  # alive: A does not reconcile at start
    dead = cluster.crashed(ago=5)
    orphan = _place(b.storage, shared_data / CT)
    later = utcnow() + dt.timedelta(seconds=10)
    a = cluster.start(clock=lambda: later, settle=2.0)
    assert not a.recovery.at_start().full_scan

    a.recovery.sweep()
    deadline = time.monotonic() + 30
    while cluster.row(dead).recovered_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.row(dead).recovered_at is not None
    assert cluster.indexed() == {str(dcmread(orphan).SOPInstanceUID): b.storage.relative(orphan)}


def test_a_file_another_recovery_indexed_meanwhile_stays_where_it_is(cluster: Cluster, shared_data: Path) -> None:
    """Two reconcilers adopting the same file (a duty that lapsed mid-scan): the second must not quarantine it."""
    stored = _place(Storage(cluster.data_dir), shared_data / CT)
    cluster.crashed(ago=0)
    a = cluster.start()
    assert len(a.recovery.at_start().indexed) == 1
    b = cluster.start()
    report = RecoveryReport()
    from node.index.records import Recorder

    b.recovery._adopt(Recorder("keep_first"), stored, b.storage.relative(stored), report)

    assert report.quarantined == [] and stored.is_file()
    with cluster.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Instance)).scalar() == 1
