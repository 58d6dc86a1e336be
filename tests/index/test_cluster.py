"""Node processes on one index (node.index.cluster): leases, same-host death by lock, duties, migrations.

What a user relies on: work is taken from a process only once it is gone (its lease ran out, or on the
same host its lock is free: a kill -9 is seen at once), never from a live one; a duty is held by one
process at a time and passes on when its holder stops or dies; processes starting together on an empty
database all come up.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, String, literal, select, update

from node.index import cluster
from node.index.cluster import Membership, hold_duty, owner_gone, release_duty
from node.index.db import make_engine, migrate
from node.index.models import NodeProcess, utcnow


@pytest.fixture
def url(any_index_url: str) -> str:
    return any_index_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    e = make_engine(url)
    migrate(e)
    yield e
    e.dispose()


def _gone_one(conn: Connection, owner: str | None) -> bool:
    """Evaluate owner_gone for one owner value (as a job row with that owner would)."""
    value = literal(owner, String(64))
    return bool(conn.execute(select(owner_gone(value, utcnow()))).scalar())


def test_a_live_process_is_never_gone_and_a_stopped_or_silent_one_is(engine: Engine, tmp_path: Path) -> None:
    live = Membership(engine, tmp_path / "run", lease=30)
    stopped = Membership(engine, tmp_path / "run", lease=30)
    silent = Membership(engine, tmp_path / "run", lease=30)
    for m in (live, stopped, silent):
        m.register()
    stopped.stop(clean=True)
    with engine.begin() as conn:  # its last heartbeat was a lease ago (another host: no lock to look at)
        conn.execute(
            update(NodeProcess.__table__)
            .where(NodeProcess.__table__.c.id == silent.id)
            .values(expires_at=utcnow() - dt.timedelta(seconds=1))
        )
    with engine.connect() as conn:
        assert not _gone_one(conn, live.id)
        assert _gone_one(conn, stopped.id)
        assert _gone_one(conn, silent.id)
        assert _gone_one(conn, None)  # claimed by nobody (an older version's row)
        assert _gone_one(conn, "another-host:1:unknown")
    assert live.beat()
    live.stop(clean=True)


def _hold_lock_then_sleep(url: str, run_dir: str, ready: multiprocessing.synchronize.Event) -> None:
    e = make_engine(url)
    m = Membership(e, Path(run_dir), lease=600)
    m.register()
    ready.set()
    time.sleep(600)


def test_a_process_killed_on_this_host_is_gone_at_once_not_after_its_lease(engine: Engine, url: str, tmp_path) -> None:
    """kill -9 of a process with a 10-minute lease: the next look from this host sees its free lock."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_lock_then_sleep, args=(url, str(tmp_path / "run"), ready), daemon=True)
    child.start()
    try:
        assert ready.wait(60), "the child process did not register"
        me = Membership(engine, tmp_path / "run", lease=30)
        me.register()
        (other,) = [p for p in cluster.processes(engine) if p.pid == child.pid]
        assert other.alive()
        assert me.expire_dead_here() == []  # alive: its lock is held
        assert me.others_alive()
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert me.expire_dead_here() == [other.id]
        assert not me.others_alive()
        with engine.connect() as conn:
            assert _gone_one(conn, other.id)
        assert [p.id for p in cluster.crashed(engine)] == [other.id]  # to be reconciled
        me.stop(clean=True)
    finally:
        if child.is_alive():
            child.kill()


def test_a_process_with_no_lock_file_here_waits_for_its_lease(engine: Engine, tmp_path: Path) -> None:
    """Same host name, but its lock is not in our run directory (another data directory): no guessing."""
    other = Membership(engine, tmp_path / "elsewhere", lease=30)
    other.register()
    me = Membership(engine, tmp_path / "run", lease=30)
    me.register()
    assert me.expire_dead_here() == []
    with engine.connect() as conn:
        assert not _gone_one(conn, other.id)
    other.stop(clean=True)
    me.stop(clean=True)


def test_a_duty_is_held_by_one_process_and_passes_on_when_it_expires_or_is_released(engine: Engine) -> None:
    assert hold_duty(engine, "retention", "a", 30)
    assert not hold_duty(engine, "retention", "b", 30)
    assert hold_duty(engine, "retention", "a", 30)  # renewed by its holder
    release_duty(engine, "retention", "a")
    assert hold_duty(engine, "retention", "b", 0.2)
    assert not hold_duty(engine, "retention", "a", 30)
    time.sleep(0.4)  # b did not renew it
    assert hold_duty(engine, "retention", "a", 30)


def test_a_clean_stop_gives_up_duties_and_needs_no_reconciling(engine: Engine, tmp_path: Path) -> None:
    m = Membership(engine, tmp_path / "run", lease=30)
    m.register()
    assert hold_duty(engine, "recovery", m.id, 30)
    m.stop(clean=True)
    assert hold_duty(engine, "recovery", "next", 30)
    assert cluster.crashed(engine) == []


def test_rows_of_processes_stopped_long_ago_are_removed_at_a_start(engine: Engine, tmp_path: Path) -> None:
    old = Membership(engine, tmp_path / "run", lease=30)
    old.register()
    old.stop(clean=True)
    with engine.begin() as conn:
        conn.execute(
            update(NodeProcess.__table__).values(stopped_at=utcnow() - cluster.FORGET_AFTER - dt.timedelta(hours=1))
        )
    new = Membership(engine, tmp_path / "run", lease=30)
    new.register()
    assert [p.id for p in cluster.processes(engine)] == [new.id]
    new.stop(clean=True)


def _migrate(url: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    e = make_engine(url)
    barrier.wait(30)
    migrate(e)
    e.dispose()


@pytest.mark.parametrize("n", [3])
def test_processes_migrating_an_empty_database_at_once_all_succeed(url: str, n: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_migrate, args=(url, barrier)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n
    e = make_engine(url)
    with e.connect() as conn:
        assert conn.exec_driver_sql("select count(*) from alembic_version").scalar() == 1
    e.dispose()
