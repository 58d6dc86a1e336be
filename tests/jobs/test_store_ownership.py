"""Jobs shared by several node processes on one index (node.jobs.store, issue 16), on SQLite and PostgreSQL.

What a user relies on when two or more processes run jobs from one table: every job is claimed by
exactly one of them; a process's late outcome never overwrites what happened to the job since (an
operator's cancel, or another process having taken it over); a job whose process is gone is taken up
again, and a job whose process is alive is left alone. Processes are real registrations
(node.index.cluster.Membership) in the migrated index; the claimers are threads with engines of their
own, as separate processes have.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.index.cluster import Membership
from node.index.db import make_engine, migrate
from node.index.models import Job, NodeProcess, Patient, Series, Study, aware
from node.jobs import store
from node.jobs.store import NewJob, create_jobs


@dataclass
class Index:
    url: str
    engine: Engine
    run_dir: Path

    def process(self, lease: float = 30) -> Membership:
        """A node process registered in this index (its lease runs until stopped)."""
        m = Membership(self.engine, self.run_dir, lease=lease)
        m.register()
        return m

    def make(self, n: int) -> list[int]:
        """``n`` forward jobs of series #1 revision 1, as the tracker makes them."""
        with self.engine.begin() as conn:
            return create_jobs(conn, 1, 1, [NewJob(f"rule-{i}", 0, "forward", {"to": ["pacs"]}) for i in range(n)])

    def job(self, job_id: int) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, job_id)
            assert job is not None
            s.expunge(job)
            return job


@pytest.fixture
def index(any_index_url: str, tmp_path: Path) -> Iterator[Index]:
    url = any_index_url
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as s:
        s.add(
            Series(
                series_instance_uid="1.2.3.1",
                state="triggered",
                study=Study(study_instance_uid="1.2.3", patient=Patient()),
            )
        )
        s.commit()
    try:
        yield Index(url, engine, tmp_path / "run")
    finally:
        engine.dispose()


def test_two_processes_claiming_at_once_take_every_job_exactly_once(index: Index) -> None:
    """Each claimer asks for half the jobs at the same time: every ask gets a job, and no job goes to both.

    A claim that lost a race for a row (read it, then found it taken) would come back empty although
    jobs are left: on PostgreSQL that is what ``FOR UPDATE SKIP LOCKED`` prevents.
    """
    per_claimer = 60
    ids = index.make(2 * per_claimer)
    procs = [index.process(), index.process()]
    start = threading.Barrier(len(procs))
    claimed: dict[str, list[int | None]] = {p.id: [] for p in procs}
    errors: list[BaseException] = []

    def claim(owner: str) -> None:
        engine = make_engine(index.url)  # a process of its own: its own connections
        try:
            start.wait(10)
            for _ in range(per_claimer):
                job = store.claim_next(engine, owner)
                claimed[owner].append(job.id if job else None)
        except BaseException as e:
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=claim, args=(p.id,)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(None not in got for got in claimed.values()), {o: got.count(None) for o, got in claimed.items()}
    assert sorted(j for got in claimed.values() for j in got if j is not None) == ids  # each exactly once
    for owner, got in claimed.items():  # the index says who runs each
        assert {(index.job(j).state, index.job(j).owner, index.job(j).attempts) for j in got} == {
            (
                "running",
                owner,
                1,
            )
        }
    assert store.claim_next(index.engine, procs[0].id) is None  # none left
    for p in procs:
        p.stop(clean=True)


def test_a_finish_by_another_process_is_ignored(index: Index) -> None:
    [job_id] = index.make(1)
    owner, other = index.process(), index.process()
    job = store.claim_next(index.engine, owner.id)
    assert job is not None and job.id == job_id

    late = store.finish(index.engine, job_id, other.id, ok=False, error="not mine", retry_at=None)

    assert late == store.Finished("running", False, owner.id)
    j = index.job(job_id)
    assert (j.state, j.owner, j.last_error) == ("running", owner.id, "")  # as its owner left it
    assert store.finish(index.engine, job_id, owner.id, ok=True, result="done") == store.Finished("succeeded", True)
    j = index.job(job_id)
    assert (j.state, j.owner, j.result) == ("succeeded", None, "done")


def test_an_owner_finishing_a_job_cancelled_meanwhile_leaves_it_cancelled(index: Index) -> None:
    [job_id] = index.make(1)
    owner = index.process()
    assert store.claim_next(index.engine, owner.id) is not None
    store.cancel(index.engine, job_id, actor="test")

    assert store.finish(index.engine, job_id, owner.id, ok=True, result="done") == store.Finished("cancelled", False)
    j = index.job(job_id)
    assert (j.state, j.owner, j.result) == ("cancelled", None, "")
    assert j.last_error == "cancelled by an operator"


def test_take_over_requeues_a_dead_process_job_and_leaves_a_live_one(index: Index) -> None:
    live_job, dead_job = index.make(2)
    live, dead = index.process(), index.process()
    assert store.claim_next(index.engine, live.id).id == live_job  # type: ignore[union-attr]
    assert store.claim_next(index.engine, dead.id).id == dead_job  # type: ignore[union-attr]

    assert store.take_over(index.engine) == []  # both alive: nothing is taken
    dead.stop(clean=False)  # as a crash leaves it: the lease has ended, no clean stop

    taken = store.take_over(index.engine)

    assert taken == [store.TakenOver(dead_job, "rule-1", 1, dead.id)]
    j = index.job(dead_job)
    assert (j.state, j.owner) == ("pending", None)
    assert j.last_error == f"node process {dead.id} stopped while this job was running; taken up again"
    j = index.job(live_job)
    assert (j.state, j.owner, j.last_error) == ("running", live.id, "")
    assert store.take_over(index.engine) == []  # once

    # The dead process's late outcome (it was only cut off from the index) does not count ...
    assert store.finish(index.engine, dead_job, dead.id, ok=True, result="late") == store.Finished("pending", False)
    # ... nor does it overwrite the run of the process that took the job up.
    assert store.claim_next(index.engine, live.id).id == dead_job  # type: ignore[union-attr]
    assert store.finish(index.engine, dead_job, dead.id, ok=True, result="late") == store.Finished(
        "running", False, live.id
    )
    j = index.job(dead_job)
    assert (j.state, j.owner, j.attempts, j.result) == ("running", live.id, 2, "")
    live.stop(clean=True)


def test_take_over_waits_for_the_end_of_a_silent_process_lease(index: Index) -> None:
    """A process (on another host, say) that stops beating loses its jobs once its lease is over, not before."""
    [job_id] = index.make(1)
    silent = index.process(lease=3)
    assert store.claim_next(index.engine, silent.id) is not None
    with index.engine.connect() as conn:
        expires = aware(conn.execute(select(NodeProcess.expires_at).where(NodeProcess.id == silent.id)).scalar_one())

    assert store.take_over(index.engine, expires) == []  # the lease still runs at its last instant
    taken = store.take_over(index.engine, expires + dt.timedelta(seconds=1))

    assert [t.id for t in taken] == [job_id]
    assert (index.job(job_id).state, index.job(job_id).owner) == ("pending", None)
