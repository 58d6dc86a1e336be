"""The series tracker: when has a series fully arrived, and what does it trigger?

The durable state is the series row (``state``, ``revision``,
``revision_instances``, ``last_received_at``), kept by the receive path in
the UPDATE it makes per instance anyway, plus a ``series_revision`` row per
revision that became stable. APScheduler is only the timer: one date job per
series, keyed by the series id. An arrival that moves the deadline later
does not touch the scheduler; when the job fires early it looks at the
newest arrival and re-schedules itself to the real deadline (a debounce that
costs the receive path nothing per instance). Only an earlier deadline (the
expected count reached) re-schedules at once.

A series becomes stable in one conditional UPDATE (``state = 'receiving'``
and the same revision and nothing newer than the cut-off), so an instance
committed meanwhile wins and the timer is simply re-armed. Then the rules are
evaluated and the revision's jobs made in one transaction (unique per
revision, rule and action). On start-up, receiving series are re-armed from
the table (overdue ones fire at once) and stable revisions whose jobs were
not made yet are evaluated again; nothing is kept only in memory.

Several node processes may share the index (docs/scale-out.md). A series is timed by the process that
received it; if that process dies, :meth:`SeriesTracker.sweep` (run on every heartbeat) in another
process adopts every receiving series it does not time itself once its last arrival is older than the
shortest quiet period any rule may give it plus the lease, and triggers stable revisions left
untriggered for longer than the lease. Two processes timing one series is harmless: marking it stable
is conditional, and a revision is triggered by the one transaction that claims it
(``triggered_at IS NULL``); the other makes no job, audit event or log line for it.

Study rules (node.decide.study) are timed the same way: the transaction that triggers a series sets its
study's ``study_rules_due``; the study is then evaluated (one timer job per study), and a rule waiting for
a quiet period moves ``study_rules_due`` to its end. Start-up re-arms every study with a due time, and the
sweep takes up studies overdue by more than the lease.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, and_, or_, select, update
from sqlalchemy.orm import Session

from node import audit
from node.config import Config
from node.decide.facts import dataset_facts, expected_instances, first_instance, read_dataset, series_snapshot
from node.decide.rerun import rule_jobs
from node.decide.rules import ForwardAction, PluginAction, RuleSet
from node.decide.study import evaluate_study, mark_due
from node.index.models import Series, SeriesRevision, Study, aware, utcnow
from node.index.records import RecordOutcome
from node.index.states import SeriesState, series_tracking
from node.jobs.store import NewJob, create_jobs
from node.logs import phi
from node.qr.priors import is_prior_study

log = logging.getLogger(__name__)

_series = Series.__table__
_revision = SeriesRevision.__table__
_study = Study.__table__
#: Seconds between sweeps that look at every untriggered revision, not only those of tracked series.
FULL_SWEEP = 600.0


@dataclass
class _Pending:
    """What the timer knows about a receiving series (the table stays the authority)."""

    revision: int
    last: dt.datetime
    count: int
    stable_after: float
    expected: int | None = None
    #: Where stable_after / expected come from, for the logs.
    source: str = ""
    timing_known: bool = False
    job_at: dt.datetime | None = None

    def due(self) -> dt.datetime:
        if self.expected is not None and self.count >= self.expected:
            return self.last
        return self.last + dt.timedelta(seconds=self.stable_after)


class SeriesTracker:
    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        on_jobs: Callable[[], None] | None = None,
        reader: Engine | None = None,
        *,
        lease: float | None = None,
    ) -> None:
        """``reader``: an engine for reads only (on SQLite, reads then take no write lock).

        ``lease``: the node processes' lease (``[node] lease`` unless given): how long :meth:`sweep` leaves a
        series or revision to the process that is timing it before taking it up.
        """
        self.cfg = cfg
        self.lease = cfg.node.lease if lease is None else lease
        self.engine = engine
        self.reader = reader or engine
        self.ruleset: RuleSet = cfg.ruleset if cfg.ruleset is not None else RuleSet([])
        self.data_dir: Path = cfg.data_dir
        self.on_jobs = on_jobs
        self._pending: dict[int, _Pending] = {}
        #: When sweep() last read every untriggered revision (start() does too).
        self._full_sweep = time.monotonic()
        self._lock = threading.Lock()
        self.scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            executors={"default": ThreadPoolExecutor(4)},
            # A job that fires late (the process was busy or down) still runs: no misfire is ever dropped.
            # max_instances > 1: a job re-added while its previous run is still going must not be dropped
            # (APScheduler skips, and then deletes, a run beyond max_instances). _fire is safe to overlap.
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 16},
        )

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()
        now = utcnow()
        with self.reader.connect() as conn:
            receiving = conn.execute(
                select(
                    _series.c.id, _series.c.revision, _series.c.last_received_at, _series.c.revision_instances
                ).where(_series.c.state == SeriesState.RECEIVING, _series.c.series_instance_uid != "")
            ).all()
            untriggered = conn.execute(
                select(_revision.c.series_fk, _revision.c.revision).where(_revision.c.triggered_at.is_(None))
            ).all()
            studies = conn.execute(
                select(_study.c.id, _study.c.study_rules_due).where(_study.c.study_rules_due.is_not(None))
            ).all()
        for study_id, due in studies:
            self._schedule_study(study_id, aware(due))
        for sid, revision, last, count in receiving:
            with self._lock:
                self._pending[sid] = _Pending(revision, aware(last), count, self.cfg.tracker.stable_after)
            self._schedule(sid, now)  # computes its timing, then waits or fires at once if overdue
        for sid, revision in untriggered:
            self._schedule_trigger(sid, revision, now)
        if receiving or untriggered or studies:
            log.info(
                "series tracker: %d receiving series re-armed from the index, %d stable revision(s) to evaluate, "
                "%d stud(ies) whose study rules are due",
                len(receiving),
                len(untriggered),
                len(studies),
            )

    def stop(self) -> None:
        self.scheduler.shutdown(wait=True)

    # -- other processes' series (the heartbeat thread) ------------------------

    @property
    def adopt_after(self) -> float:
        """Seconds after its last arrival that a receiving series nobody here times is taken up.

        The shortest quiet period of the default and every rule (no series is due earlier, except by an
        expected count) plus the lease (its own process, if alive, has decided by then).
        """
        rules = [r.model.stable_after for r in self.ruleset if r.model.stable_after is not None]
        return min([self.cfg.tracker.stable_after, *rules]) + self.lease

    def sweep(self) -> None:
        """Take up what a process that died left: series it was timing, revisions it did not trigger.

        Cheap: both reads go by the series' state index (receiving or stable series are few). A revision
        left untriggered under a series that moved on since (a newer revision, triggered by another
        process) is found by a scan of all revisions, every :data:`FULL_SWEEP` seconds only.
        """
        if not self.scheduler.running:
            return
        now = utcnow()
        untriggered = [
            _revision.c.triggered_at.is_(None),
            _revision.c.stable_at < now - dt.timedelta(seconds=self.lease),
        ]
        if time.monotonic() - self._full_sweep < FULL_SWEEP:
            untriggered.append(_revision.c.series_fk.in_(select(_series.c.id).where(series_tracking(_series))))
        else:
            self._full_sweep = time.monotonic()
        with self.reader.connect() as conn:
            receiving = conn.execute(
                select(
                    _series.c.id, _series.c.revision, _series.c.last_received_at, _series.c.revision_instances
                ).where(
                    _series.c.state == SeriesState.RECEIVING,
                    _series.c.series_instance_uid != "",
                    _series.c.last_received_at < now - dt.timedelta(seconds=self.adopt_after),
                )
            ).all()
            revisions = conn.execute(select(_revision.c.series_fk, _revision.c.revision).where(*untriggered)).all()
            studies = conn.execute(
                select(_study.c.id).where(_study.c.study_rules_due < now - dt.timedelta(seconds=self.lease))
            ).all()
        self._adopt([(sid, rev, aware(last), count) for sid, rev, last, count in receiving], now)
        self._take_up([(sid, rev) for sid, rev in revisions], now)
        overdue = [study_id for (study_id,) in studies if self.scheduler.get_job(f"study-{study_id}") is None]
        for study_id in overdue:
            self._schedule_study(study_id, now)
        if overdue:
            log.warning(
                "series tracker: the study rules of %d stud(ies) were due over %g s ago, evaluated here (study #%s)",
                len(overdue),
                self.lease,
                ", #".join(map(str, overdue)),
            )

    def _adopt(self, receiving: list[tuple[int, int, dt.datetime, int]], now: dt.datetime) -> None:
        """Time the receiving series (id, revision, last arrival, count) that this process does not time."""
        adopted = []
        for sid, revision, last, count in receiving:
            with self._lock:
                p = self._pending.get(sid)
                if p is not None and p.revision >= revision:
                    continue  # timed here
                self._pending[sid] = _Pending(revision, last, count, self.cfg.tracker.stable_after)
            adopted.append(sid)
            self._schedule(sid, now)  # works out its timing, then marks it stable or waits
        if adopted:
            log.info(
                "series tracker: %d receiving series not timed here and without an instance for over %g s "
                "(their node process may have stopped): timed here too (series #%s)",
                len(adopted),
                self.adopt_after,
                ", #".join(map(str, adopted)),
            )

    def _take_up(self, revisions: list[tuple[int, int]], now: dt.datetime) -> None:
        """Evaluate the rules of stable revisions (series id, revision) that nobody evaluated in time."""
        taken = []
        for sid, revision in revisions:
            if self.scheduler.get_job(f"trigger-{sid}-{revision}") is not None:
                continue  # a retry of it is scheduled here
            taken.append((sid, revision))
            self._schedule_trigger(sid, revision, now)
        if taken:
            log.warning(
                "series tracker: %d stable revision(s) left without their rules evaluated for over %g s, "
                "evaluated here (series #%s)",
                len(taken),
                self.lease,
                ", #".join(f"{sid} revision {rev}" for sid, rev in taken),
            )

    # -- arrivals (receive threads) ------------------------------------------

    def arrived(self, outcome: RecordOutcome, received_at: dt.datetime) -> None:
        """Called after an instance's row committed; cheap, never blocks on I/O."""
        if outcome.kind == "duplicate" or not outcome.series_id:
            return
        sid = outcome.series_id
        when = None
        with self._lock:
            p = self._pending.get(sid)
            if p is None or p.revision < outcome.revision:
                p = self._pending[sid] = _Pending(
                    outcome.revision, received_at, outcome.revision_instances, self.cfg.tracker.stable_after
                )
                p.job_at = when = received_at  # right away: work out its timing from the first instance
            elif p.revision > outcome.revision:
                return
            else:
                if received_at > p.last:
                    p.last = received_at
                p.count = max(p.count, outcome.revision_instances)
                due = p.due()
                if p.job_at is None or due < p.job_at:
                    p.job_at = when = due
        if when is not None:
            self._schedule(sid, when)

    def _schedule(self, sid: int, when: dt.datetime) -> None:
        self.scheduler.add_job(
            self._fire_logged, "date", run_date=when, args=[sid], id=f"series-{sid}", replace_existing=True
        )

    def _schedule_trigger(self, sid: int, revision: int, when: dt.datetime, reason: str = "", attempt: int = 1) -> None:
        self.scheduler.add_job(
            self._trigger_logged,
            "date",
            run_date=when,
            args=[sid, revision, reason, attempt],
            id=f"trigger-{sid}-{revision}",
            replace_existing=True,
        )

    def _schedule_study(self, study_id: int, when: dt.datetime, attempt: int = 1) -> None:
        self.scheduler.add_job(
            self._study_logged,
            "date",
            run_date=when,
            args=[study_id, attempt],
            id=f"study-{study_id}",
            replace_existing=True,
        )

    # -- the timer (scheduler threads) --------------------------------------

    def _fire_logged(self, sid: int) -> None:
        try:
            self._fire(sid)
        except Exception:
            log.exception("series tracker: checking series #%d failed; retrying in 5 s", sid)
            self._schedule(sid, utcnow() + dt.timedelta(seconds=5))

    def _timing(self, sid: int, p: _Pending) -> None:
        """stable_after and the expected count for this revision, from its first instance and the rules."""
        if not (self.ruleset.needs_timing or self.cfg.tracker.use_expected_counts):
            p.timing_known = True
            return
        with Session(self.reader) as s:
            first = first_instance(s, sid, p.revision)
        if first is None:
            p.timing_known = True
            return
        try:
            ds = read_dataset(self.data_dir / first.file_path)
        except Exception as e:
            log.warning(
                "series #%d: cannot read its first instance (%s): %s; using the default timing", sid, first.file_path, e
            )
            p.timing_known = True
            return
        stable_after, expected, rule = self.ruleset.timing(
            dataset_facts(ds, revision=p.revision, calling_ae=first.calling_ae, called_ae=first.called_ae)
        )
        if stable_after is not None:
            p.stable_after, p.source = stable_after, f"rule {rule!r}"
        if expected is not None:
            p.expected, p.source = expected, f"expected_instances = {expected} of rule {rule!r}"
        elif self.cfg.tracker.use_expected_counts:
            n, why = expected_instances(ds)
            if n is not None:
                p.expected, p.source = n, why
        p.timing_known = True

    def _fire(self, sid: int) -> None:
        with self._lock:
            p = self._pending.get(sid)
        if p is None:
            return
        if not p.timing_known:
            self._timing(sid, p)
        now = utcnow()
        with self._lock:
            if self._pending.get(sid) is not p:
                return  # a newer revision took over; its own job handles it
            due = p.due()
            if due > now:
                p.job_at = due
        if due > now:
            self._schedule(sid, due)
            return
        stable, reason = self._mark_stable(sid, p, now)
        if not stable:
            return
        with self._lock:
            if self._pending.get(sid) is p:
                del self._pending[sid]
        self._trigger_logged(sid, p.revision, reason)

    def _mark_stable(self, sid: int, p: _Pending, now: dt.datetime) -> tuple[bool, str]:
        cutoff = now - dt.timedelta(seconds=p.stable_after)
        complete = p.expected is not None and p.count >= p.expected
        quiet = _series.c.last_received_at <= cutoff
        cond = or_(quiet, _series.c.revision_instances >= p.expected) if p.expected is not None else quiet
        with self.engine.begin() as conn:
            done = conn.execute(
                update(_series)
                .where(
                    _series.c.id == sid,
                    _series.c.state == SeriesState.RECEIVING,
                    _series.c.revision == p.revision,
                    cond,
                )
                .values(state=SeriesState.STABLE)
            ).rowcount
            row = conn.execute(
                select(
                    _series.c.state,
                    _series.c.revision,
                    _series.c.revision_instances,
                    _series.c.revision_started_at,
                    _series.c.last_received_at,
                ).where(_series.c.id == sid)
            ).first()
            if done == 1 and row is not None:
                if complete:
                    reason = f"{row.revision_instances} of {p.expected} expected instances ({p.source})"
                else:
                    src = f", {p.source}" if p.source and "rule" in p.source and "expected" not in p.source else ""
                    reason = f"no instance for {p.stable_after:g} s{src}"
                conn.execute(
                    _revision.insert().values(
                        series_fk=sid,
                        revision=p.revision,
                        instance_count=row.revision_instances,
                        started_at=row.revision_started_at,
                        last_received_at=row.last_received_at,
                        stable_at=now,
                        stable_reason=reason[:256],
                        matched_rules="",
                        error="",
                    )
                )
                return True, reason
        # Not stable after all: something arrived that the timer had not heard of yet.
        if row is not None and row.state == SeriesState.RECEIVING and row.revision == p.revision:
            with self._lock:
                p.last = max(p.last, aware(row.last_received_at))
                p.count = max(p.count, row.revision_instances)
                due = p.job_at = p.due()
            self._schedule(sid, max(due, now))
        else:  # made stable by another process (or gone, or a newer revision opened there): not ours to time
            with self._lock:
                if self._pending.get(sid) is p:
                    del self._pending[sid]
        return False, ""

    # -- rules and jobs ------------------------------------------------------

    def _trigger_logged(self, sid: int, revision: int, reason: str = "", attempt: int = 1) -> None:
        """_trigger, retried with back-off: a stable revision must get its jobs (the table keeps it stable)."""
        try:
            self._trigger(sid, revision, reason)
        except Exception:
            delay = min(300, 5 * 2 ** (attempt - 1))
            log.exception(
                "series tracker: evaluating the rules for series #%d revision %d failed (attempt %d); retrying in %d s",
                sid,
                revision,
                attempt,
                delay,
            )
            self._schedule_trigger(sid, revision, utcnow() + dt.timedelta(seconds=delay), reason, attempt + 1)

    def _trigger(self, sid: int, revision: int, reason: str) -> None:
        """Evaluate the rules for a stable revision and make its jobs, all in one transaction.

        The transaction first claims the revision (sets ``triggered_at`` where it is still NULL): of two
        processes triggering it, only the one that claims it makes jobs, audits and logs.
        """
        now = utcnow()
        error = ""
        jobs: list[NewJob] = []
        matched: list[str] = []
        if self._triggered(sid, revision):
            return
        with Session(self.reader) as s:
            try:
                snap = series_snapshot(s, self.data_dir, sid, revision)
            except Exception as e:
                snap, error = None, f"cannot read the series' first instance: {type(e).__name__}: {e}"
        if snap is None and not error:
            error = "the series has no instances (discarded?)"
        label = f"series #{sid}"
        extra: dict[str, Any] = {"series_id": sid, "revision": revision}
        prior = False
        if snap is not None:
            # Patient name and ID help an operator find the study; they are shown only with redact_phi off.
            name, pid = snap.facts["PatientName"], snap.facts["PatientID"]
            label = (
                f'series {snap.series_uid} ({snap.modality} "{snap.description}", {snap.instance_count} inst.; '
                f'patient "{phi(name) or ""}", ID "{phi(pid) or ""}")'
            )
            extra.update(series_uid=snap.series_uid, study_uid=snap.study_uid)
            # A prior retrieved for a job (node.qr.priors) is indexed and kept, but no rule acts on it.
            prior = is_prior_study(self.reader, snap.study_uid)
            try:
                results = [] if prior else self.ruleset.evaluate(snap.facts)
            except Exception as e:
                results, error = [], f"evaluating the rules failed: {type(e).__name__}: {e}"
            matched, jobs = rule_jobs(results)
        uids = {"series_uid": snap.series_uid, "study_uid": snap.study_uid} if snap is not None else {}
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(_revision)
                .where(
                    _revision.c.series_fk == sid, _revision.c.revision == revision, _revision.c.triggered_at.is_(None)
                )
                .values(triggered_at=now, matched_rules=",".join(matched), error=error)
            ).rowcount
            if claimed != 1:
                log.debug("series #%d revision %d: triggered by another process meanwhile", sid, revision)
                return
            for name in matched:  # audited with the jobs, in the transaction that makes them
                audit.record(conn, "rule_fired", actor="node", rule=name, detail=f"revision {revision}", **uids)
            made = create_jobs(conn, sid, revision, jobs, **uids) if jobs else []
            # The study's rules see this series now (evaluated after this commits).
            # (Never a prior's: a retrieved prior study is an input of others' jobs, not a study of its own.)
            study_due = (
                mark_due(conn, sid, now) if snap is not None and not prior and self.ruleset.study_rules else None
            )
            conn.execute(
                update(_series)
                .where(and_(_series.c.id == sid, _series.c.revision == revision, _series.c.state == SeriesState.STABLE))
                .values(state=SeriesState.TRIGGERED)
            )
        when = f" ({reason})" if reason else ""
        if error:
            log.error(
                "%s revision %d is stable%s but no rule was evaluated: %s", label, revision, when, error, extra=extra
            )
        elif matched:
            actions = "; ".join(_summary(j) for j in jobs)
            log.info(
                "%s revision %d is stable%s: rule(s) %s matched -> %d job(s): %s",
                label,
                revision,
                when,
                ", ".join(matched),
                len(made),
                actions,
                extra=dict(extra, rules=matched, job_ids=made),
            )
        elif snap is not None and is_prior_study(self.reader, snap.study_uid):
            log.info(
                "%s revision %d is stable%s: a prior study retrieved for a job; no rule is evaluated for it",
                label,
                revision,
                when,
                extra=extra,
            )
        else:
            log.info("%s revision %d is stable%s: no rule matched", label, revision, when, extra=extra)
        if made and self.on_jobs:
            self.on_jobs()
        if study_due is not None:
            self._schedule_study(study_due, now)

    def _study_logged(self, study_id: int, attempt: int = 1) -> None:
        """Evaluate a study's rules (node.decide.study); retried with back-off (its due time stays set)."""
        try:
            out = evaluate_study(self.engine, self.reader, self.data_dir, self.ruleset, study_id)
        except Exception:
            delay = min(300, 5 * 2 ** (attempt - 1))
            log.exception(
                "series tracker: evaluating the study rules for study #%d failed (attempt %d); retrying in %d s",
                study_id,
                attempt,
                delay,
            )
            self._schedule_study(study_id, utcnow() + dt.timedelta(seconds=delay), attempt + 1)
            return
        for rule, why in out.waiting.items():
            log.info("study %s: study rule %s is %s", out.study_uid, rule, why, extra={"study_uid": out.study_uid})
        if out.due is not None:
            self._schedule_study(study_id, out.due)
        if any(ids for _, _, ids in out.fired) and self.on_jobs:
            self.on_jobs()

    def _triggered(self, sid: int, revision: int) -> bool:
        """Whether the revision's rules were evaluated already (by another process): then nothing is read."""
        with self.reader.connect() as conn:
            row = conn.execute(
                select(_revision.c.triggered_at).where(_revision.c.series_fk == sid, _revision.c.revision == revision)
            ).first()
        return row is None or row.triggered_at is not None


#: The job kinds whose log line says what the action does (others say their kind).
_SUMMARIZED: dict[str, type[PluginAction] | type[ForwardAction]] = {"plugin": PluginAction, "forward": ForwardAction}


def _summary(job: NewJob) -> str:
    kind = _SUMMARIZED.get(job.kind)
    if kind is None:
        return job.kind
    return kind.model_validate(job.action).summary()
