"""Worker threads that take pending jobs and run them.

Workers wake when the tracker makes jobs (``wake()``) and otherwise look at
the table every few seconds, which is how a ``dicom-node jobs retry`` from
another process, or a retry whose back-off has passed, is picked up.

The runner claims jobs as its node process (``owner``, node.index.cluster).
A job left ``running`` by a process that is gone (killed, or its lease ran
out) is pending again, at start and on every heartbeat (:meth:`take_over`):
taken up, not lost. Its handler must tolerate a second run (forwarding the
same instances again is harmless to a PACS; a discard finds fewer files).
A live process's running jobs are never taken.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select, update

from node import metrics
from node.config import Config
from node.derive.store import OutputStore
from node.index.models import Job, utcnow
from node.index.states import JobState
from node.jobs import store
from node.jobs.actions import JobContext, JobDeferred, JobFailed, handler_for
from node.qr.priors import Retrieves
from node.storage import Storage

log = logging.getLogger(__name__)

POLL = 2.0


class JobRunner:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        storage: Storage,
        outputs: OutputStore | None = None,
        reader: Engine | None = None,
        *,
        owner: str,
    ) -> None:
        """``reader``: an engine for the frequent polls (next due job, cancelled?) that only read.

        ``owner``: this node process's id (``Membership.id``), recorded on every job it claims.
        """
        self.cfg = cfg
        self.owner = owner
        self.outputs = outputs
        self.reader = reader or engine
        self.engine = engine
        self.storage = storage
        #: Set by the node: tells the forward dispatcher about newly queued deliveries.
        self.wake_senders: Callable[[list[str]], None] = lambda names: None
        #: Set by the node: its C-STORE write path (node.receive.ingest.Ingest), for priors retrieved by C-GET.
        self.ingest: Any = None
        self._wake = threading.Condition()
        self._pending_wake = False
        self._stop = threading.Event()
        self._claim_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True) for i in range(cfg.jobs.workers)
        ]
        #: Retrieves of priors run here, not on the job workers (a slow PACS would hold one up to retrieve_timeout);
        #: the job is deferred meanwhile and made due again when its retrieve ends.
        self.retrieves = Retrieves(owner, done=self._retrieved)
        self._resume: set[int] = set()
        self._resume_lock = threading.Lock()

    def start(self) -> None:
        self.take_over()
        self.retrieves.start()
        for t in self._threads:
            t.start()

    def take_over(self) -> None:
        """Make the jobs of node processes that are gone pending again, and wake the workers for them.

        Run at start and on every heartbeat (``Membership.on_beat``).
        """
        taken = store.take_over(self.engine, utcnow())
        for t in taken:
            log.warning(
                "job %d (rule %s) was running in %s, which stopped (attempt %d): taking it up again",
                t.id,
                t.rule,
                f"node process {t.owner}" if t.owner else "an earlier run of the node",
                t.attempts,
                extra={"job_id": t.id, "rule": t.rule},
            )
        if taken:
            self.wake()

    def stop(self, timeout: float = 10) -> bool:
        """Let running jobs finish for up to ``timeout`` s; False if some did not (the stop is then not clean).

        Any still running are taken up again by another node process once this one is gone, or at the next
        start.
        """
        self._stop.set()
        self.retrieves.stop()
        self.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        running = sum(t.is_alive() for t in self._threads)
        if running:
            log.warning(
                "%d job(s) still running after %g s: this stop is not clean; they are taken up again", running, timeout
            )
        return running == 0

    def wake(self) -> None:
        with self._wake:
            self._pending_wake = True
            self._wake.notify_all()

    def _sleep(self) -> None:
        timeout = POLL
        try:
            due = store.next_due(self.reader)
        except Exception:
            due = None
        if due is not None:
            wait = (due - utcnow()).total_seconds()
            # Due already but not claimed: it waits for other jobs (a discard), which wake us when they end.
            if wait > 0:
                timeout = min(POLL, wait)
        with self._wake:
            # stop() wakes once; a worker that comes here after another took that wake must not wait a poll.
            if not self._pending_wake and not self._stop.is_set():
                self._wake.wait(timeout)
            self._pending_wake = False

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                with self._claim_lock:
                    job = store.claim_next(self.engine, self.owner)
            except Exception as e:
                log.error("could not read the job table: %s", e)
                job = None
            if job is None:
                self._sleep()
                continue
            try:
                self._run(job)
            except Exception:  # e.g. the index was unreachable when recording the end: the job stays
                # "running" and is taken up again once this process is gone; this worker carries on.
                log.exception("job %d: could not record its outcome", job.id)

    def _cancelled(self, job_id: int) -> bool:
        """Whether the job is no longer this run's: cancelled, or taken over by another process."""
        with self.reader.connect() as conn:
            row = conn.execute(select(Job.state, Job.owner).where(Job.id == job_id)).first()
        return row is None or row.state != JobState.RUNNING or row.owner != self.owner

    def _run(self, job: store.ClaimedJob) -> None:
        t0 = time.monotonic()
        log.info(
            "job %d started: rule %s, action %d (%s), series #%d revision %d, attempt %d of %d",
            job.id,
            job.rule,
            job.action_index,
            job.kind,
            job.series_id,
            job.revision,
            job.attempts,
            job.max_attempts,
            extra=self._extra(job),
        )
        ctx = JobContext(
            job,
            self.cfg,
            self.engine,
            self.storage,
            lambda: self._cancelled(job.id),
            self.outputs,
            self.wake_senders,
            ingest=self.ingest,
            retrieves=self.retrieves,
        )
        try:
            result = handler_for(job.kind)(ctx)
        except JobDeferred as e:
            self._deferred(job, e)
            return
        except JobFailed as e:
            self._failed(job, str(e), e.retryable, t0)
            return
        except Exception as e:  # a bug in a handler fails the job, never the worker
            log.exception("job %d: unexpected error", job.id)
            self._failed(job, f"internal error: {type(e).__name__}: {e}", True, t0)
            return
        done = store.finish(self.engine, job.id, self.owner, ok=True, result=result)
        self.wake()  # a job waiting for this one may go now
        took = time.monotonic() - t0
        # The outcome that counts is the recorded one: a job cancelled while it ran did not succeed.
        metrics.JOB_SECONDS.labels(*metrics.job_labels(job.kind, job.action), _outcome(done)).observe(took)
        if done.recorded:
            log.info("job %d succeeded in %.1f s: %s", job.id, took, result, extra=self._extra(job))
        else:
            self._not_recorded(job, f"succeeded ({result})", done)

    def _deferred(self, job: store.ClaimedJob, e: JobDeferred) -> None:
        """The job waits for something outside the node: pending again at ``e.retry_at``, no attempt spent."""
        done = store.defer(self.engine, job.id, self.owner, note=str(e), until=e.retry_at)
        with self._resume_lock:
            resume = job.id in self._resume
            self._resume.discard(job.id)
        if resume:  # its retrieve ended while it was still deferring
            self._due_now(job.id)
        self.wake()
        if done.recorded:
            log.warning("job %d: %s", job.id, e, extra=self._extra(job))
        else:
            self._not_recorded(job, f"deferred ({e})", done)

    def _retrieved(self, job_id: int) -> None:
        """A retrieve of the job's priors ended (node.qr.priors.Retrieves): the job may go on at once.

        The job may not be deferred yet (a quick retrieve): then :meth:`_deferred` does it.
        """
        with self._resume_lock:
            self._resume.add(job_id)
        if self._due_now(job_id):
            with self._resume_lock:
                self._resume.discard(job_id)
        self.wake()

    def _due_now(self, job_id: int) -> bool:
        """Make a deferred (pending) job due now; False if it is not pending."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.PENDING).values(not_before=utcnow())
            )
        return done.rowcount == 1

    def _failed(self, job: store.ClaimedJob, error: str, retryable: bool, t0: float) -> None:
        retry_at = None
        if retryable and job.attempts < job.max_attempts:
            delay = self.cfg.jobs.retry_delay * 2 ** (job.attempts - 1)
            retry_at = utcnow() + dt.timedelta(seconds=delay)
        done = store.finish(self.engine, job.id, self.owner, ok=False, error=error, retry_at=retry_at)
        state = done.state
        self.wake()
        labels = metrics.job_labels(job.kind, job.action)
        metrics.JOB_SECONDS.labels(*labels, _outcome(done)).observe(time.monotonic() - t0)
        if not done.recorded:
            # Cancelled, or taken over by another process (which runs it again): not this run's failure.
            self._not_recorded(job, f"failed ({error})", done)
            return
        metrics.JOB_FAILURES.labels(*labels, "false" if state == JobState.PENDING else "true").inc()
        if state == JobState.PENDING:
            log.warning(
                "job %d attempt %d of %d failed after %.1f s: %s; retrying at %s",
                job.id,
                job.attempts,
                job.max_attempts,
                time.monotonic() - t0,
                error,
                retry_at.isoformat(timespec="seconds") if retry_at else "",
                extra=self._extra(job),
            )
        else:
            why = "" if retryable else " (not retried: another attempt would fail the same way)"
            log.error(
                "job %d failed after %d attempt(s): %s%s", job.id, job.attempts, error, why, extra=self._extra(job)
            )

    def _extra(self, job: store.ClaimedJob) -> dict[str, Any]:
        """Structured log fields of a job (JSON logs carry them as keys), with the process running it."""
        return {
            "job_id": job.id,
            "rule": job.rule,
            "job_kind": job.kind,
            "series_id": job.series_id,
            "revision": job.revision,
            "attempt": job.attempts,
            "owner": self.owner,
        }

    def _not_recorded(self, job: store.ClaimedJob, outcome: str, now: store.Finished) -> None:
        """Log a run whose outcome was not written because the job is no longer this run's, and why."""
        if now.state == JobState.CANCELLED:
            log.info(
                "job %d %s but was cancelled while it ran; its outcome is not recorded",
                job.id,
                outcome,
                extra=self._extra(job),
            )
            return
        if now.state == "missing":
            why = "the job is no longer in the index (its series was deleted)"
        else:
            by = f"node process {now.owner}" if now.owner else "another node process"
            why = (
                f"the job was taken over by {by} after this process's lease ran out (is its heartbeat failing?);"
                f" it is {now.state} there now"
            )
        log.warning("job %d %s, but its outcome is not recorded: %s", job.id, outcome, why, extra=self._extra(job))


def _outcome(done: store.Finished) -> str:
    """The ``outcome`` label of a run: the state it recorded, or why it recorded none."""
    if done.recorded:
        return JobState.FAILED if done.state == JobState.PENDING else done.state
    return JobState.CANCELLED if done.state == JobState.CANCELLED else "taken_over"
