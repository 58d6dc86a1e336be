"""The index writer against another process's transactions, one race at a time (deterministic).

The other process is played by a second connection in this test, which holds its locks exactly as long
as the test says: a deadlock with the writer, an instance the other side inserts first, and (SQLite) the
write lock file that lets writers of several processes take turns.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from node.dicom.files import read_file_header
from node.index.db import make_engine, migrate
from node.index.records import DuplicatePolicy, InstanceRecord, Recorder, to_record
from node.index.writer import IndexWriter, Tx


@pytest.fixture
def pg(postgres_url: str) -> Engine:
    engine = make_engine(postgres_url)
    migrate(engine)
    with engine.begin() as c:  # the writer's session finds the deadlock first (it waits first), in 0.1 s
        c.exec_driver_sql(f"ALTER DATABASE {engine.url.database} SET deadlock_timeout = '100ms'")
    engine.dispose()
    return engine


@pytest.fixture
def record(shared_data: Path) -> InstanceRecord:
    path = next(p for p in sorted((shared_data / "series" / "ct-head-philips-5mm").iterdir()) if p.name != "DIRFILE")
    header, size, _meta = read_file_header(path)
    return to_record(header, file_path="files/writer.dcm", file_size=size, checksum="-")


def _wait_until_blocked(engine: Engine, timeout: float = 30) -> None:
    """Until some session of this database waits for a lock (the writer, blocked by the other side)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # A new transaction each time: PostgreSQL keeps a transaction's first view of pg_stat_activity.
        with engine.connect() as c:
            waiting = c.execute(
                text(
                    "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'"
                )
            ).scalar()
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError("the writer never waited for the other transaction's lock")


def test_a_deadlocked_batch_runs_again_and_its_caller_sees_only_the_result(pg: Engine, caplog):
    with pg.begin() as c:
        c.exec_driver_sql("create table counter (id integer primary key, n integer not null)")
        c.exec_driver_sql("insert into counter values (1, 0), (2, 0)")
    epochs = []
    writer = IndexWriter(pg)
    writer.start()
    runs = []

    def work(tx: Tx) -> str:
        runs.append(1)
        epochs.append(tx.epoch)
        tx.cur.execute("update counter set n = n + 1 where id = 1")
        tx.cur.execute("update counter set n = n + 1 where id = 2")  # the other side holds row 2
        return "done"

    other = pg.raw_connection()
    try:
        cur = other.cursor()
        cur.execute("set deadlock_timeout = '10s'")  # so that the writer is the one PostgreSQL aborts
        cur.execute("update counter set n = n + 10 where id = 2")
        with caplog.at_level(logging.INFO, logger="node.index.writer"):
            fut = writer.submit(work)
            _wait_until_blocked(pg)  # the writer holds row 1 and waits for row 2
            cur.execute("update counter set n = n + 10 where id = 1")  # ... and now we wait for row 1: deadlock
            other.commit()
            assert fut.result(timeout=30) == "done"
    finally:
        other.close()
        writer.stop()
    with pg.connect() as c:
        assert c.execute(text("select id, n from counter order by id")).all() == [(1, 11), (2, 11)]
    assert len(runs) == 2
    assert epochs[0] != epochs[1], "ids cached in the rolled-back run must not be trusted in the next"
    assert "deadlock detected" in caplog.text and "running it again (attempt 2 of 5)" in caplog.text
    pg.dispose()


@pytest.mark.parametrize("parents", ["new", "indexed before"])
@pytest.mark.parametrize(("policy", "kind"), [("keep_first", "duplicate"), ("overwrite", "replaced")])
def test_an_instance_another_process_recorded_first_ends_as_a_duplicate_or_a_replacement(
    pg: Engine, record: InstanceRecord, policy: DuplicatePolicy, kind: str, parents: str
):
    """The other process records the same instance and has not committed yet when the writer runs.

    With new parents, the writer's patient INSERT waits for the other's and then finds its row; with
    parents indexed before, the writer's SELECT finds no instance, its series UPDATE waits for the
    other's row lock, and its instance INSERT then meets the committed row (a Conflict: run again).
    """
    recorder = Recorder(policy)
    writer = IndexWriter(pg)
    writer.start()
    if parents == "indexed before":
        sibling = dict(record.instance, sop_instance_uid=record.sop_instance_uid + ".1", file_path="files/sibling.dcm")
        writer.call(lambda tx: recorder.record(tx, dataclasses.replace(record, instance=sibling)))
    theirs = dataclasses.replace(record, instance=dict(record.instance, file_path="files/other-process.dcm"))
    other = pg.raw_connection()
    try:
        Recorder(policy).record(Tx(other.dbapi_connection, pg.dialect), theirs)
        fut = writer.submit(lambda tx: recorder.record(tx, record))
        _wait_until_blocked(pg)
        other.commit()
        outcome = fut.result(timeout=30)
    finally:
        other.close()
        writer.stop()
    assert outcome.kind == kind
    assert outcome.old_file_path == "files/other-process.dcm"  # the file the row keeps, or the one it replaced
    with pg.connect() as c:
        path = c.execute(
            text("select file_path from instance where sop_instance_uid = :u"), {"u": record.sop_instance_uid}
        ).all()
        counts = c.execute(text("select instance_count, revision_instances from series")).all()
    pg.dispose()
    assert path == [("files/other-process.dcm",)] if kind == "duplicate" else [("files/writer.dcm",)]
    n = 1 if parents == "new" else 2
    assert counts == [(n, n)]


def test_sqlite_writers_of_several_processes_take_turns_on_the_write_lock_file(tmp_path: Path, record):
    db = tmp_path / "index.sqlite"
    engine = make_engine(f"sqlite:///{db}")
    migrate(engine)
    recorder = Recorder("keep_first")
    writer = IndexWriter(engine)
    writer.start()
    try:
        with open(f"{db}.write.lock", "ab") as lock:  # another process's writer, mid-transaction
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            fut = writer.submit(lambda tx: recorder.record(tx, record))
            done = threading.Event()
            fut.add_done_callback(lambda _f: done.set())
            assert not done.wait(0.5)  # waits for its turn ...
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            assert fut.result(timeout=30).kind == "new"  # ... and takes it when the other is done
    finally:
        writer.stop()
        engine.dispose()


def test_ids_a_recorder_cached_in_a_rolled_back_transaction_are_not_used_again(tmp_path: Path, record):
    """Two recorders share one writer (receiving, and crash recovery); a failure of one's transaction
    must not leave the other (or itself) with ids of rows that were never committed: SQLite gives the
    rolled-back series' id to the next new series, and an instance filed under a cached id would land
    in a stranger's series."""
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    writer = IndexWriter(engine)
    writer.start()
    mine, other = Recorder("keep_first"), Recorder("keep_first")

    def uids(rec: InstanceRecord, series: str, sop: str) -> InstanceRecord:
        return dataclasses.replace(
            rec,
            series=dict(rec.series, series_instance_uid=series),
            instance=dict(rec.instance, sop_instance_uid=sop, file_path=f"files/{sop}.dcm"),
        )

    def fails(tx: Tx) -> None:
        mine.record(tx, uids(record, "1.2.3.1", "1.2.3.1.1"))  # caches the new series' id ...
        raise RuntimeError("the rest of this item failed")  # ... which is rolled back

    try:
        with pytest.raises(RuntimeError):
            writer.call(fails)
        writer.call(lambda tx: other.record(tx, uids(record, "1.2.3.2", "1.2.3.2.1")))  # takes that id
        writer.call(lambda tx: mine.record(tx, uids(record, "1.2.3.1", "1.2.3.1.2")))
    finally:
        writer.stop()
    with engine.connect() as c:
        rows = c.execute(
            text(
                "select i.sop_instance_uid, s.series_instance_uid from instance i join series s on s.id = i.series_fk"
                " order by i.sop_instance_uid"
            )
        ).all()
    assert rows == [("1.2.3.1.2", "1.2.3.1"), ("1.2.3.2.1", "1.2.3.2")]
    engine.dispose()


def test_a_connection_the_database_dropped_is_replaced_and_the_batch_runs_again(pg: Engine, caplog) -> None:
    """PostgreSQL restarted, failed over, or a proxy cut the writer's connection between two instances:
    the next instance is recorded on a new connection, not refused."""
    with pg.begin() as c:
        c.exec_driver_sql("create table counter (id integer primary key, n integer not null)")
        c.exec_driver_sql("insert into counter values (1, 0)")
    writer = IndexWriter(pg)
    writer.start()

    def work(tx: Tx) -> int:
        tx.cur.execute("update counter set n = n + 1 where id = 1 returning pg_backend_pid()")
        return int(tx.cur.fetchone()[0])

    try:
        first = writer.call(work)
        with pg.connect() as c:  # the server ends the writer's session
            c.exec_driver_sql(f"select pg_terminate_backend({first})")
        with caplog.at_level(logging.WARNING, logger="node.index.writer"):
            second = writer.call(work, timeout=30)
    finally:
        writer.stop()
    assert second != first
    assert "index connection lost" in caplog.text
    with pg.connect() as c:
        assert c.execute(text("select n from counter")).scalar() == 2
    pg.dispose()
