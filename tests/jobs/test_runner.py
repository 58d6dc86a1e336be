"""The job runner on its own (node.jobs.runner): its worker threads, in-process, on a migrated SQLite index.

Real CT slices are received through Ingest; forward jobs are made as the tracker makes them and the
runner's workers take them. No dispatcher runs, so nothing is sent: a forward job's work is to queue
deliveries, which is what these tests look at. What a user relies on: a pending job is run and its
outcome recorded, the senders are woken; a job left running by a process that is gone is taken up at
start, one a live process runs is not; a job that keeps failing is retried up to its attempts and then failed with the error, and the
workers carry on with the next job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import series_files, wait_for
from helpers.ingest import receive
from pydicom import dcmread
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from node.config import Config
from node.decide.compile import load_checked_config
from node.index.cluster import Membership
from node.index.db import make_engine, migrate
from node.index.models import Delivery, Job, NodeProcess, utcnow
from node.index.writer import IndexWriter
from node.jobs import store
from node.jobs.runner import JobRunner
from node.jobs.store import NewJob, create_jobs
from node.receive.ingest import Ingest
from node.storage import Storage

CT = "ct-head-philips-5mm"

CONFIG = """
[node]
data_dir = "{data_dir}"

[jobs]
workers = {workers}  # with two, stop() may wait a whole poll (2 s) for the worker that missed its wake-up
retry_delay = 0

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
"""


@dataclass
class Jobs:
    cfg: Config
    engine: Engine
    storage: Storage
    #: The node process the runners run as (registered, lease running).
    me: Membership
    woken: list[list[str]] = field(default_factory=list)

    def make(self, *jobs: NewJob) -> list[int]:
        """Jobs of series #1 revision 1, as the tracker makes them."""
        with self.engine.begin() as conn:
            return create_jobs(conn, 1, 1, list(jobs))

    def runner(self) -> JobRunner:
        r = JobRunner(self.cfg, self.engine, self.storage, owner=self.me.id)
        r.wake_senders = self.woken.append
        return r

    def run_one(self, job_id: int) -> Job:
        """Run a runner until job ``job_id`` has ended; the job as it ended."""
        runner = self.runner()
        runner.start()
        try:
            runner.wake()
            return wait_for(lambda: self.done(job_id), 10, "the job to end")
        finally:
            runner.stop()

    def job(self, job_id: int) -> Job:
        with Session(self.engine) as s:
            job = s.get(Job, job_id)
            assert job is not None
            s.expunge(job)
            return job

    def done(self, job_id: int) -> Job | None:
        job = self.job(job_id)
        return job if job.state in ("succeeded", "failed") else None

    def deliveries(self) -> list[tuple[str, str, int | None]]:
        with Session(self.engine) as s:
            q = select(Delivery.sop_instance_uid, Delivery.destination, Delivery.job_fk).order_by(Delivery.id)
            return list(s.execute(q).all())


def _slices() -> list[Path]:
    """The two slices every test's series holds."""
    return series_files(CT)[:2]


@contextmanager
def _received(tmp_path: Path, extra_config: str = "", workers: int = 1) -> Iterator[Jobs]:
    """A migrated index holding the two slices, with a registered node process to run jobs as."""
    config = tmp_path / "node.toml"
    config.write_text(CONFIG.format(data_dir=tmp_path / "data", workers=workers) + extra_config)
    cfg = load_checked_config(config, environ={})
    storage = Storage(cfg.data_dir)
    storage.prepare()
    engine = make_engine(cfg.database_url)
    migrate(engine)
    writer = IndexWriter(engine)
    writer.start()
    ingest = Ingest(storage, writer)
    for path in _slices():
        receive(storage, ingest, path)
    writer.stop()
    me = Membership(engine, tmp_path / "run", lease=30)
    me.register()
    try:
        yield Jobs(cfg, engine, storage, me)
    finally:
        me.stop(clean=True)
        engine.dispose()


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    with _received(tmp_path) as j:
        yield j


def _uids() -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in _slices()]


def test_a_pending_job_is_run_and_its_outcome_recorded(jobs: Jobs) -> None:
    [job_id] = jobs.make(NewJob("ct", 0, "forward", {"type": "forward", "to": ["pacs"]}))
    job = jobs.run_one(job_id)

    assert (job.state, job.attempts, job.last_error) == ("succeeded", 1, "")
    assert job.result == "queued 2 instance(s) for pacs"
    assert sorted(jobs.deliveries()) == sorted((uid, "pacs", job_id) for uid in _uids())
    assert jobs.woken == [["pacs"]]  # the senders are told at once


def test_a_job_left_running_by_a_dead_process_is_taken_up_at_start(jobs: Jobs, tmp_path: Path) -> None:
    dead, live = jobs.make(
        NewJob("ct", 0, "forward", {"type": "forward", "to": ["pacs"]}),
        NewJob("ct", 1, "forward", {"type": "forward", "to": ["pacs"]}),
    )
    gone = Membership(jobs.engine, tmp_path / "run", lease=30)
    gone.register()
    other = Membership(jobs.engine, tmp_path / "run", lease=30)
    other.register()
    with jobs.engine.begin() as conn:  # claimed by a process that then died, and by one that runs on
        conn.execute(update(Job).where(Job.id == dead).values(state="running", attempts=1, owner=gone.id))
        conn.execute(update(Job).where(Job.id == live).values(state="running", attempts=1, owner=other.id))
    gone.stop(clean=False)  # as a crash leaves it: the lease ended, no clean stop

    runner = jobs.runner()
    runner.start()
    try:
        job = wait_for(lambda: jobs.done(dead), 10, "the job to be taken up")
    finally:
        runner.stop()
        other.stop(clean=True)

    assert (job.state, job.attempts, job.owner) == ("succeeded", 2, None)
    assert len(jobs.deliveries()) == 2  # queued once, not lost
    still = jobs.job(live)  # the live process's job is its own: not taken, not run here
    assert (still.state, still.attempts, still.owner) == ("running", 1, other.id)


def test_a_failing_job_is_retried_then_failed_and_the_workers_carry_on(jobs: Jobs) -> None:
    # An action without its destinations (a row edited by hand): the handler fails unexpectedly.
    broken, good = jobs.make(
        NewJob("broken", 0, "forward", {"type": "forward"}, priority=1, max_attempts=2),
        NewJob("ct", 0, "forward", {"type": "forward", "to": ["pacs"]}),
    )
    runner = jobs.runner()
    runner.start()
    try:
        runner.wake()
        failed = wait_for(lambda: jobs.done(broken), 10, "the broken job to fail")
        ok = wait_for(lambda: jobs.done(good), 10, "the good job to end")
    finally:
        runner.stop()

    assert (failed.state, failed.attempts) == ("failed", 2)  # retried once (retry_delay = 0), then given up
    assert "KeyError" in failed.last_error and "to" in failed.last_error, failed.last_error
    assert ok.state == "succeeded"
    assert [d[2] for d in jobs.deliveries()] == [good, good]


def test_a_job_whose_destination_left_the_config_fails_at_once_and_says_so(jobs: Jobs) -> None:
    [job_id] = jobs.make(NewJob("ct", 0, "forward", {"type": "forward", "to": ["old-pacs"]}))
    job = jobs.run_one(job_id)

    assert (job.state, job.attempts) == ("failed", 1)  # another attempt would fail the same way
    assert "no destination 'old-pacs' in the config" in job.last_error, job.last_error
    assert jobs.deliveries() == [] and jobs.woken == []


def test_a_result_for_a_job_taken_over_meanwhile_is_not_recorded_and_the_log_says_why(
    jobs: Jobs, caplog: pytest.LogCaptureFixture
) -> None:
    """This process's lease ran out while its job ran (its heartbeat could not be written, say) and
    another process took the job up: the late success must not overwrite the other's run."""
    [job_id] = jobs.make(NewJob("ct", 0, "forward", {"type": "forward", "to": ["pacs"]}))
    other = Membership(jobs.engine, jobs.me.run_dir, lease=30)
    other.register()
    runner = jobs.runner()
    taken: list[store.TakenOver] = []

    def meanwhile(names: list[str]) -> None:
        """Called by the forward job when it has queued its deliveries, before it records its end."""
        with jobs.engine.begin() as conn:  # our lease runs out ...
            conn.execute(update(NodeProcess).where(NodeProcess.id == jobs.me.id).values(expires_at=utcnow()))
        taken.extend(store.take_over(jobs.engine))  # ... the other process takes the job up and runs it
        assert store.claim_next(jobs.engine, other.id) is not None

    runner.wake_senders = meanwhile
    caplog.set_level(logging.INFO, logger="node.jobs.runner")
    runner.start()
    try:
        runner.wake()
        wait_for(lambda: "not recorded" in caplog.text or None, 10, "the runner to record the end")
    finally:
        runner.stop()
        other.stop(clean=True)

    assert [t.id for t in taken] == [job_id]
    job = jobs.job(job_id)
    assert (job.state, job.owner, job.attempts, job.result) == ("running", other.id, 2, "")  # the other's run
    assert (
        f"job {job_id} succeeded (queued 2 instance(s) for pacs), but its outcome is not recorded: the job was "
        f"taken over by node process {other.id} after this process's lease ran out" in caplog.text
    ), caplog.text
    assert f"job {job_id} succeeded in" not in caplog.text


def test_two_runners_on_one_postgresql_index_run_each_job_once(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two node processes' runners (two workers each, engines of their own) share one job table."""
    n = 40
    destinations = "".join(
        f'\n[[destinations]]\nname = "d{i}"\nae_title = "D{i}"\nhost = "127.0.0.1"\nport = 104\n' for i in range(n)
    )
    caplog.set_level(logging.INFO, logger="node.jobs.runner")
    with _received(tmp_path, f'\n[database]\nurl = "{postgres_url}"\n' + destinations, workers=2) as jobs:
        # Each job forwards to a destination of its own (two jobs queueing the same instances for the
        # same destination at the same moment is the delivery queue's concern, not this test's).
        ids = jobs.make(*(NewJob(f"r{i}", 0, "forward", {"type": "forward", "to": [f"d{i}"]}) for i in range(n)))
        second = Membership(jobs.engine, jobs.me.run_dir, lease=30)
        second.register()
        engines = [make_engine(postgres_url), make_engine(postgres_url)]
        runners = [
            JobRunner(jobs.cfg, engines[0], jobs.storage, owner=jobs.me.id),
            JobRunner(jobs.cfg, engines[1], jobs.storage, owner=second.id),
        ]
        for r in runners:
            r.wake_senders = lambda names: time.sleep(0.02)  # a little work, so both runners get some
            r.start()
        try:
            for r in runners:
                r.wake()

            def beat_then_done() -> bool | None:
                """Both processes' heartbeats take over what is left by dead ones: nothing here."""
                for r in runners:
                    r.take_over()
                return all(jobs.done(j) for j in ids) or None

            wait_for(beat_then_done, 60, "every job to end")
        finally:
            for r in runners:
                r.stop()
            second.stop(clean=True)
            for e in engines:
                e.dispose()

        for j in ids:
            job = jobs.job(j)
            assert (job.state, job.attempts, job.owner) == ("succeeded", 1, None), (j, job.state, job.last_error)
        started = [r for r in caplog.records if r.getMessage().startswith("job ") and " started: " in r.getMessage()]
        assert sorted(r.job_id for r in started) == ids  # each run once
        by = {o: sum(1 for r in started if r.owner == o) for o in (jobs.me.id, second.id)}
        assert all(by.values()), by  # both processes ran jobs
        assert sorted((d[1], d[2]) for d in jobs.deliveries()) == sorted(
            (f"d{i}", j) for i, j in enumerate(ids) for _ in range(2)
        )


class _OnStart(logging.Handler):
    """Calls ``fn`` in the worker when it logs that job ``job_id`` started (after its claim, before its work)."""

    def __init__(self, job_id: int, fn: Callable[[], None]) -> None:
        super().__init__()
        self.job_id, self.fn = job_id, fn

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "job_id", None) == self.job_id and " started: " in record.getMessage():
            self.fn()


def test_a_job_taken_over_before_its_work_is_left_to_the_process_that_took_it(
    jobs: Jobs, caplog: pytest.LogCaptureFixture
) -> None:
    """The process that lost its job (its lease ran out) stops at the next step: nothing is queued twice."""
    [job_id] = jobs.make(NewJob("ct", 0, "forward", {"type": "forward", "to": ["pacs"]}))
    other = Membership(jobs.engine, jobs.me.run_dir, lease=30)
    other.register()

    def lose_it() -> None:
        with jobs.engine.begin() as conn:
            conn.execute(update(NodeProcess).where(NodeProcess.id == jobs.me.id).values(expires_at=utcnow()))
        assert [t.id for t in store.take_over(jobs.engine)] == [job_id]
        assert store.claim_next(jobs.engine, other.id) is not None

    hook = _OnStart(job_id, lose_it)
    log = logging.getLogger("node.jobs.runner")
    log.addHandler(hook)
    caplog.set_level(logging.INFO, logger="node.jobs.runner")
    runner = jobs.runner()
    runner.start()
    try:
        runner.wake()
        wait_for(lambda: "not recorded" in caplog.text or None, 10, "the runner to give the job up")
    finally:
        runner.stop()
        log.removeHandler(hook)
        other.stop(clean=True)

    job = jobs.job(job_id)
    assert (job.state, job.owner, job.attempts) == ("running", other.id, 2)
    assert jobs.deliveries() == [] and jobs.woken == []  # left to the other process
    assert f"taken over by node process {other.id}" in caplog.text, caplog.text
