"""Scheduled clean-up: series past their age, and more when the disk is too full; never data still on its way.

The unit is a whole series (every revision of it): a PACS or a viewer asking this node never sees
half a series vanish, and the series directory goes with it. Two kinds are configured apart:
*sources*, series the node received, and *outputs*, series the node derived (their instances carry
the job that made them); *priors*, series of prior studies the node retrieved for a job from a
``[[sources]]`` PACS (node.qr.priors), are a third kind, kept while a job that asked for them runs. A series is deleted only when nothing still needs it:

- it is not receiving, and the rules have evaluated its last revision (tracker state ``triggered``);
- no job of it is pending or running, nor the job making it (for an output), nor a study rule's job of
  its study (which reads the study's other series too);
- none of its instances has a delivery queued, being sent, failed (failed means *not delivered*:
  an operator retries or cancels it first), or delivered but awaiting a storage commitment;
- for a source: no output made from it is waiting for such a delivery either. An output, once
  stored, could be sent without its source, but a failed output delivery is often fixed by running
  the job again, which needs the source; so the source waits for its outputs.

Cancelled deliveries do not protect anything: cancelling is an operator's decision.

Each series goes in one transaction that checks all of this again under the write lock, deletes
the rows, removes the files and then commits (see :mod:`node.storage.removal` for why this order).
The series, study and patient rows go too once nothing refers to them; while delivery rows (the
history of what was sent) or the lineage of a remaining output still refer to a series, its row
stays with no instances, and a later run removes it once that history is pruned.

Several node processes may share the index: the scheduled clean-up runs only in the one holding the
duty ``retention`` (:func:`node.index.cluster.hold_duty`), taken or renewed before each run and while
it goes on; when its holder dies another process takes it up after the duty's lease. A run asked for
by an operator (``dicom-node retention``, the API) runs wherever it is asked: every series is checked
again in its own transaction, so it is safe next to the holder's run.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, delete, exists, func, select, true, update
from sqlalchemy.exc import SQLAlchemyError

from node import audit, units
from node.config import Config
from node.index.cluster import hold_duty, live_ids
from node.index.models import (
    Delivery,
    Duty,
    Instance,
    Job,
    Patient,
    PriorFetch,
    Series,
    SeriesRevision,
    Study,
    StudyTrigger,
    aware,
    utcnow,
)
from node.index.states import DELIVERY_IN_FLIGHT, delivery_not_arrived, job_active, series_tracking
from node.storage import Storage
from node.storage.removal import delete_instance_rows, remove_files

log = logging.getLogger(__name__)

KINDS = ("sources", "outputs", "priors")
#: Seconds from start-up to the first scheduled run (not at once: start-up has enough to do).
FIRST_RUN_DELAY = 10.0
#: Why a series that is due is kept, in the order they are checked.
REASONS: dict[str, str] = {
    "receiving": "still receiving, or not yet evaluated by the rules",
    "job": "a job of it (or making it) is pending or running",
    "undelivered": "deliveries not finished (queued, sending, failed, or awaiting storage commitment)",
    "outputs_undelivered": "an output made from it is not delivered yet",
}
#: Delivery rows removed per statement when pruning the history.
PRUNE_CHUNK = 5000
#: The duty whose holder runs the scheduled clean-up (node.index.cluster).
DUTY = "retention"

_s, _i, _d = Series.__table__, Instance.__table__, Delivery.__table__
_j, _rev = Job.__table__, SeriesRevision.__table__
_study, _patient = Study.__table__, Patient.__table__
_pf = PriorFetch.__table__
_trigger = StudyTrigger.__table__

DiskUsage = Callable[[Path], tuple[int, int, int]]


def _undelivered() -> Any:
    """A delivery that has not (yet) arrived, or whose commitment is outstanding or refused.

    Unlike the discard action (``queue.unfinished_for_series``), a *cancelled* delivery does not
    protect: an operator decided it will not be sent, and old data must not be kept for ever because
    of it. A discard right after forwarding keeps the stricter rule: it waits for arrival.
    """
    return delivery_not_arrived(_d, cancelled=False)


def protected_series(conn: Connection, series_ids: list[int] | None = None) -> dict[int, str]:
    """{series id: reason} for the series (all, or those given) that must not be deleted now."""
    out: dict[int, str] = {}

    def only(col: Any) -> Any:
        return true() if series_ids is None else col.in_(series_ids)

    unfinished_job = job_active(_j)
    queries = {
        "receiving": [
            select(_s.c.id).where(series_tracking(_s), only(_s.c.id)),
            select(_rev.c.series_fk).where(_rev.c.triggered_at.is_(None), only(_rev.c.series_fk)),
        ],
        "job": [
            select(_j.c.series_fk).where(unfinished_job, only(_j.c.series_fk)),
            select(_i.c.series_fk).join(_j, _j.c.id == _i.c.job_fk).where(unfinished_job, only(_i.c.series_fk)),
            # A prior study stays while a job that asked for it has not finished.
            select(_s.c.id)
            .select_from(
                _s.join(_study, _study.c.id == _s.c.study_fk)
                .join(_pf, _pf.c.study_uid == _study.c.study_instance_uid)
                .join(_j, _j.c.id == _pf.c.job_fk)
            )
            .where(unfinished_job, only(_s.c.id)),
            # A study rule's job reads every input series of its study, not only its own (the primary).
            select(_s.c.id)
            .select_from(
                _s.join(_trigger, _trigger.c.study_fk == _s.c.study_fk).join(_j, _j.c.study_trigger_fk == _trigger.c.id)
            )
            .where(unfinished_job, only(_s.c.id)),
        ],
        "undelivered": [
            select(_i.c.series_fk).join(_d, _d.c.instance_fk == _i.c.id).where(_undelivered(), only(_i.c.series_fk)),
        ],
        "outputs_undelivered": [
            select(_j.c.series_fk)
            .select_from(_d.join(_i, _i.c.id == _d.c.instance_fk).join(_j, _j.c.id == _i.c.job_fk))
            .where(_undelivered(), only(_j.c.series_fk)),
        ],
    }
    for reason, stmts in queries.items():
        for stmt in stmts:
            for sid in conn.execute(stmt.distinct()).scalars():
                out.setdefault(sid, reason)
    return out


def _row_removable() -> Any:
    """A series row (correlated) that nothing needs any more: no instances, no history, no lineage."""
    return and_(
        ~series_tracking(_s),
        ~exists().where(_i.c.series_fk == _s.c.id),
        ~exists().where(_rev.c.series_fk == _s.c.id, _rev.c.triggered_at.is_(None)),
        ~exists().where(_d.c.series_fk == _s.c.id),
        ~exists().where(_j.c.series_fk == _s.c.id, job_active(_j)),
        ~exists().where(_i.c.job_fk == _j.c.id, _j.c.series_fk == _s.c.id),
        ~exists().where(_d.c.job_fk == _j.c.id, _j.c.series_fk == _s.c.id),
    )


def _drop_study_triggers(conn: Connection, which: Any) -> None:
    """Delete the study rule firings ``which`` selects, unlinking any job that still names one.

    A firing whose primary series (or study) goes has nothing left to fire again on: a series received
    again is a new row, so its input set is new anyway. Its jobs are the primary series' own (deleted
    with it, :func:`_row_removable` having checked nothing needs them); unlinking first keeps the
    foreign key satisfied whatever else names the firing.
    """
    ids = select(_trigger.c.id).where(which)
    conn.execute(update(_j).where(_j.c.study_trigger_fk.in_(ids)).values(study_trigger_fk=None))
    conn.execute(delete(_trigger).where(which))


def drop_series_row(conn: Connection, series_id: int) -> tuple[int, int, int]:
    """Delete an empty series' row (its revisions, jobs and the study rule firings it was the primary input
    of too) and the study and patient it leaves empty.

    Only when nothing refers to it (see :func:`_row_removable`). Returns the (series, study,
    patient) rows deleted.
    """
    row = conn.execute(select(_s.c.study_fk).where(_s.c.id == series_id, _row_removable())).first()
    if row is None:
        return 0, 0, 0
    conn.execute(delete(_rev).where(_rev.c.series_fk == series_id))
    _drop_study_triggers(conn, _trigger.c.primary_series_fk == series_id)
    conn.execute(delete(_j).where(_j.c.series_fk == series_id))
    conn.execute(delete(_s).where(_s.c.id == series_id))
    studies = patients = 0
    if conn.execute(select(_s.c.id).where(_s.c.study_fk == row.study_fk).limit(1)).first() is None:
        patient_fk = conn.execute(select(_study.c.patient_fk).where(_study.c.id == row.study_fk)).scalar()
        _drop_study_triggers(conn, _trigger.c.study_fk == row.study_fk)
        studies = conn.execute(delete(_study).where(_study.c.id == row.study_fk)).rowcount
        if (
            patient_fk is not None
            and conn.execute(select(_study.c.id).where(_study.c.patient_fk == patient_fk).limit(1)).first() is None
        ):
            patients = conn.execute(delete(_patient).where(_patient.c.id == patient_fk)).rowcount
    return 1, studies, patients


# --- the report -----------------------------------------------------------------------------------


@dataclass
class KindCount:
    series: int = 0
    instances: int = 0
    bytes: int = 0


@dataclass
class RetentionReport:
    """What one run deleted (or, with ``dry_run``, would delete) and what it kept, and why."""

    dry_run: bool = False
    started_at: dt.datetime = field(default_factory=utcnow)
    finished_at: dt.datetime | None = None
    #: By kind ("sources", "outputs"): series, instances and bytes deleted.
    deleted: dict[str, KindCount] = field(default_factory=lambda: {k: KindCount() for k in KINDS})
    #: Series deleted because of their age, and to bring the disk below the low watermark.
    by_age: int = 0
    by_watermark: int = 0
    #: Series Instance UIDs deleted, oldest first.
    series_uids: list[str] = field(default_factory=list)
    #: Delivery rows of deleted instances removed (older than delivery_history_days).
    pruned_deliveries: int = 0
    #: Index rows of series, studies and patients left empty and removed.
    series_rows_removed: int = 0
    studies_removed: int = 0
    patients_removed: int = 0
    #: Due series kept, by reason (see :data:`REASONS`), and their size.
    blocked: dict[str, int] = field(default_factory=dict)
    blocked_bytes: int = 0
    #: Series the watermark would have taken but whose kind has by_watermark = false.
    not_by_watermark: int = 0
    not_by_watermark_bytes: int = 0
    #: Percent of the storage filesystem used when the watermark pass began (after this run's deletions by
    #: age, which it decides on) and at its end (None: no watermark configured).
    disk_used_before: float | None = None
    disk_used_after: float | None = None
    #: "off", "below" (nothing to do), "reached" or "not reached".
    watermark: str = "off"
    #: True when the node stopped during the run (the rest waits for the next one).
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def series(self) -> int:
        return sum(k.series for k in self.deleted.values())

    @property
    def instances(self) -> int:
        return sum(k.instances for k in self.deleted.values())

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self.deleted.values())

    def as_dict(self) -> dict[str, Any]:
        """For the API: plain JSON values."""
        return {
            "dry_run": self.dry_run,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "deleted": {k: vars(v).copy() for k, v in self.deleted.items()},
            "deleted_series": self.series,
            "deleted_instances": self.instances,
            "deleted_bytes": self.bytes,
            "by_age": self.by_age,
            "by_watermark": self.by_watermark,
            "series_uids": list(self.series_uids),
            "pruned_deliveries": self.pruned_deliveries,
            "series_rows_removed": self.series_rows_removed,
            "studies_removed": self.studies_removed,
            "patients_removed": self.patients_removed,
            "blocked": dict(self.blocked),
            "blocked_bytes": self.blocked_bytes,
            "not_by_watermark": self.not_by_watermark,
            "not_by_watermark_bytes": self.not_by_watermark_bytes,
            "disk_used_before": self.disk_used_before,
            "disk_used_after": self.disk_used_after,
            "watermark": self.watermark,
            "interrupted": self.interrupted,
            "errors": list(self.errors),
        }

    def lines(self) -> list[str]:
        """For people: what happened, one fact a line."""
        verb = "would delete" if self.dry_run else "deleted"
        out = [
            ("dry run: nothing was changed" if self.dry_run else "retention run")
            + f" ({self.started_at:%Y-%m-%d %H:%M:%S} UTC)"
        ]
        for kind, k in self.deleted.items():
            out.append(f"{kind}: {verb} {k.series} series, {k.instances} instances, {units.size(k.bytes)}")
        if self.series:
            out.append(f"  {self.by_age} series by age, {self.by_watermark} for the disk watermark")
            out.extend(f"  {uid}" for uid in self.series_uids)
        if self.disk_used_before is not None:
            disk = f"disk {self.disk_used_before:.1f} % used"
            if self.disk_used_after is not None:
                disk += f", now {self.disk_used_after:.1f} %"
            out.append(f"{disk}; watermark: {self.watermark}")
        if self.blocked:
            parts = ", ".join(f"{n} {REASONS[r]}" for r, n in sorted(self.blocked.items()))
            out.append(f"kept {sum(self.blocked.values())} due series ({units.size(self.blocked_bytes)}): {parts}")
        if self.not_by_watermark:
            out.append(
                f"kept {self.not_by_watermark} series ({units.size(self.not_by_watermark_bytes)}) whose kind has "
                "by_watermark = false"
            )
        prune = "would prune" if self.dry_run else "pruned"
        out.append(f"{prune} {self.pruned_deliveries} delivery rows of deleted instances")
        if self.series_rows_removed or self.studies_removed or self.patients_removed:
            out.append(
                f"{'would remove' if self.dry_run else 'removed'} the index rows of {self.series_rows_removed} "
                f"empty series, {self.studies_removed} studies, {self.patients_removed} patients"
            )
        if self.interrupted:
            out.append("interrupted (the node is stopping, or another process took the duty); the next run goes on")
        out.extend(f"error: {e}" for e in self.errors)
        return out


class RetentionBusy(RuntimeError):
    """A run is already going on in this process."""


@dataclass
class _Candidate:
    id: int
    uid: str
    last: dt.datetime
    revision: int
    kind: str
    instances: int
    size: int


def _percent(usage: tuple[int, int, int]) -> tuple[float, int, int]:
    """(percent used as df shows it, used bytes, used + available bytes)."""
    _total, used, free = usage
    room = used + free
    return (100.0 * used / room if room else 0.0), used, room


class Retention:
    """The clean-up: :meth:`run_once` now, or every ``[retention] interval`` seconds between :meth:`start` and :meth:`stop`.

    ``reader`` (a read-only engine) is used for the survey, so that it does not hold SQLite's write
    lock. ``disk_usage`` is :func:`shutil.disk_usage` except in tests. Removing series, study and
    patient rows is safe while a node receives, in this process or another: the index writer's
    cache of their ids notices a removed row and looks it up again (:class:`node.index.records.Recorder`).

    ``owner`` is this node process's id (node.index.cluster): its scheduled runs happen only while it
    holds the duty ``retention``, for ``interval + lease`` seconds from each run (``lease``: ``[node]
    lease`` unless given), renewed every ``lease / 4`` seconds while a run goes on. Without an owner
    (the command line) there is no schedule to share.
    """

    def __init__(
        self,
        cfg: Config,
        engine: Engine,
        storage: Storage,
        *,
        reader: Engine | None = None,
        disk_usage: DiskUsage = shutil.disk_usage,
        owner: str | None = None,
        lease: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.owner = owner
        self.lease = cfg.node.lease if lease is None else lease
        #: Whether this process held the duty at its last scheduled run (None: not asked yet); for the logs.
        self._holding: bool | None = None
        self._renewed = 0.0
        self._duty_run = False
        self.engine = engine
        self.reader = reader or engine
        self.storage = storage
        self.disk_usage = disk_usage
        #: The report of the last run (for the API and the dashboard).
        self.last_report: RetentionReport | None = None
        self._actor = "retention"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scheduler: Any = None

    # -- the schedule -----------------------------------------------------------------------------

    def start(self) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        rc = self.cfg.retention
        self._stopping.clear()
        self._scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            executors={"default": ThreadPoolExecutor(1)},
            # One run at a time; a run that was due while the last one went on happens once, late.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        first = utcnow() + dt.timedelta(seconds=min(FIRST_RUN_DELAY, rc.interval))
        self._scheduler.add_job(self._scheduled, "interval", seconds=rc.interval, next_run_time=first, id="retention")
        self._scheduler.start()
        log.info("retention: clean-up every %g s (%s)", rc.interval, self.describe())

    def stop(self) -> None:
        """Stop the schedule; a run going on ends after the series it is deleting."""
        self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def describe(self) -> str:
        rc = self.cfg.retention
        parts = []
        for kind in KINDS:
            k = getattr(rc, kind)
            age = f"after {k.max_age_days:g} days" if k.max_age_days else "not by age"
            parts.append(f"{kind} {age}{', by watermark' if k.by_watermark and rc.high_watermark else ''}")
        if rc.high_watermark:
            parts.append(f"watermark {rc.high_watermark:g} % -> {rc.low_watermark:g} %")
        hist = f"{rc.delivery_history_days:g} days" if rc.delivery_history_days else "for ever"
        parts.append(f"delivery history kept {hist}")
        return "; ".join(parts)

    def _scheduled(self) -> None:
        try:
            if self.owner is not None and not self._hold():
                return
            self.run_once(scheduled=True)
        except RetentionBusy:
            log.info("retention: the previous clean-up is still running; this one is skipped")
        except Exception:
            log.exception("retention: the clean-up failed; the next run tries again")

    def _hold(self) -> bool:
        """Take or renew the duty for the schedule; says so in the log when that changes."""
        assert self.owner is not None
        held = hold_duty(self.engine, DUTY, self.owner, self.cfg.retention.interval + self.lease)
        self._renewed = time.monotonic()
        if held and self._holding is not True:
            log.info("retention: this node process runs the scheduled clean-up (it holds the retention duty)")
        elif not held and self._holding is not False:
            log.info(
                "retention: the scheduled clean-up runs in node process %s (it holds the retention duty); "
                "this process takes it up if that one stops",
                self.duty_holder() or "(another)",
            )
        self._holding = held
        return held

    def duty_holder(self) -> str | None:
        """The live node process holding the retention duty, if any."""
        d = Duty.__table__
        now = utcnow()
        with self.reader.connect() as conn:
            return conn.execute(
                select(d.c.owner).where(d.c.name == DUTY, d.c.expires_at >= now, d.c.owner.in_(live_ids(now)))
            ).scalar()

    # -- one run ------------------------------------------------------------------------------------

    def run_once(self, dry_run: bool = False, actor: str = "retention", *, scheduled: bool = False) -> RetentionReport:
        """Delete what is due now (nothing with ``dry_run``) and say what was done; never two at once.

        ``actor`` is who the audit trail names for the deletions: the schedule, or an operator.
        ``scheduled``: the schedule's run (which holds the duty and renews it as it goes).
        """
        if not self._lock.acquire(blocking=False):
            raise RetentionBusy("a clean-up is already running")
        try:
            if not scheduled:
                try:
                    holder = self.duty_holder()
                except SQLAlchemyError:  # an index not migrated to node processes yet: nobody holds it
                    holder = None
                if holder is not None and holder != self.owner:
                    log.info(
                        "retention: node process %s holds the retention duty and runs the scheduled clean-up; "
                        "this run goes ahead too (each series is checked again before it is deleted)",
                        holder,
                    )
            self._actor, self._duty_run = actor, scheduled and self.owner is not None
            report = self._run(dry_run)
        finally:
            self._lock.release()
        if not dry_run:  # the last report is the last run that deleted (or could have)
            self.last_report = report
        return report

    def _run(self, dry_run: bool) -> RetentionReport:
        r = RetentionReport(dry_run=dry_run)
        rc = self.cfg.retention
        with self.reader.connect() as conn:
            candidates = self._candidates(conn)
            protected = protected_series(conn)
        done: set[int] = set()
        blocked: dict[int, str] = {}
        for kind in KINDS:
            days = getattr(rc, kind).max_age_days
            if not days:
                continue
            cutoff = r.started_at - dt.timedelta(days=days)
            for c in candidates:
                if c.kind == kind and c.last < cutoff and not self._stop_here(r):
                    self._consider(c, f"older than {days:g} days", protected, blocked, done, r)
        if rc.high_watermark and not r.interrupted:
            self._watermark(candidates, protected, blocked, done, r)
        for c in candidates:
            if c.id in blocked:
                r.blocked[blocked[c.id]] = r.blocked.get(blocked[c.id], 0) + 1
                r.blocked_bytes += c.size
        if not r.interrupted:
            self._prune_history(r)
            self._sweep(r)
        if rc.high_watermark and not dry_run:
            r.disk_used_after = _percent(self.disk_usage(self.storage.root))[0]
        r.finished_at = utcnow()
        self._log(r)
        return r

    def _stop_here(self, r: RetentionReport) -> bool:
        if self._stopping.is_set():
            r.interrupted = True
        elif self._duty_run and time.monotonic() - self._renewed > self.lease / 4 and not self._hold():
            log.warning("retention: another node process took the retention duty; this run stops here")
            r.interrupted = True
        return r.interrupted

    def _candidates(self, conn: Connection) -> list[_Candidate]:
        """Every series with instances, oldest change first; a series of a study retrieved as a prior is a prior."""
        derived = func.max(case((_i.c.job_fk.is_not(None), 1), else_=0))
        prior = exists().where(_pf.c.study_uid == _study.c.study_instance_uid)
        rows = conn.execute(
            select(
                _s.c.id,
                _s.c.series_instance_uid,
                _s.c.last_received_at,
                _s.c.revision,
                func.count(_i.c.id),
                func.coalesce(func.sum(_i.c.file_size), 0),
                derived,
                prior.label("prior"),
            )
            .select_from(_s.join(_i, _i.c.series_fk == _s.c.id).join(_study, _study.c.id == _s.c.study_fk))
            .group_by(
                _s.c.id, _s.c.series_instance_uid, _s.c.last_received_at, _s.c.revision, _study.c.study_instance_uid
            )
            .order_by(_s.c.last_received_at, _s.c.id)
        ).all()
        return [
            _Candidate(
                sid, uid, aware(last), rev, "outputs" if out else "priors" if is_prior else "sources", int(n), int(size)
            )
            for sid, uid, last, rev, n, size, out, is_prior in rows
        ]

    def _consider(
        self,
        c: _Candidate,
        why: str,
        protected: dict[int, str],
        blocked: dict[int, str],
        done: set[int],
        r: RetentionReport,
    ) -> int:
        """Delete one due series unless it is protected; returns the bytes freed."""
        if c.id in done or c.id in blocked:
            return 0
        reason = protected.get(c.id)
        instances, size = c.instances, c.size  # a dry run counts what the survey saw
        if reason is None and not r.dry_run:
            try:
                outcome = self._delete_series(c, why)
            except Exception as e:
                log.exception("retention: deleting series %s failed", c.uid)
                r.errors.append(f"series {c.uid}: {type(e).__name__}: {e}")
                done.add(c.id)
                return 0
            if isinstance(outcome, str):
                reason = outcome
            elif outcome is None:  # gone meanwhile (a discard, another clean-up)
                done.add(c.id)
                return 0
            else:
                instances, size, (series, studies, patients) = outcome
                r.series_rows_removed += series
                r.studies_removed += studies
                r.patients_removed += patients
        if reason is not None:
            blocked[c.id] = reason
            return 0
        done.add(c.id)
        k = r.deleted[c.kind]
        k.series += 1
        k.instances += instances
        k.bytes += size
        r.series_uids.append(c.uid)
        if why.startswith("older"):
            r.by_age += 1
        else:
            r.by_watermark += 1
        log.info(
            "retention: %s series %s (%s, %d instances, %s; %s)",
            "would delete" if r.dry_run else "deleted",
            c.uid,
            c.kind,
            instances,
            units.size(size),
            why,
        )
        return size

    def _delete_series(self, c: _Candidate, why: str) -> tuple[int, int, tuple[int, int, int]] | str | None:
        """One series in one transaction: check again, delete its rows, remove its files, commit.

        Returns (instances, bytes, (series, study, patient rows)) deleted, the reason it is kept after
        all, or None when it is gone.
        """
        with self.engine.begin() as conn:
            row = conn.execute(
                select(_s.c.last_received_at, _s.c.revision).where(_s.c.id == c.id).with_for_update()
            ).first()
            if row is None:
                return None
            if aware(row.last_received_at) != c.last or row.revision != c.revision:
                return "receiving"  # instances arrived since the survey
            # Lock what could change protection meanwhile (a job or delivery retried by an operator): on
            # PostgreSQL these row locks make the retry wait; SQLite's write lock already covers them.
            conn.execute(select(_j.c.id).where(_j.c.series_fk == c.id).with_for_update()).all()
            conn.execute(select(_d.c.id).where(_d.c.series_fk == c.id).with_for_update()).all()
            reason = protected_series(conn, [c.id]).get(c.id)
            if reason is not None:
                return reason
            items = [
                (pk, rel) for pk, rel in conn.execute(select(_i.c.id, _i.c.file_path).where(_i.c.series_fk == c.id))
            ]
            gone = delete_instance_rows(conn, c.id, items)
            rows = drop_series_row(conn, c.id)
            audit.record(
                conn,
                "series_deleted",
                actor=self._actor,
                series_uid=c.uid,
                detail=f"{c.kind}, {len(gone)} instance(s): {why}",
            )
            _files, size = remove_files(self.storage, gone)  # last, just before the commit (node.storage.removal)
        return len(gone), size, rows

    def _watermark(
        self,
        candidates: list[_Candidate],
        protected: dict[int, str],
        blocked: dict[int, str],
        done: set[int],
        r: RetentionReport,
    ) -> None:
        rc = self.cfg.retention
        pct, used, room = _percent(self.disk_usage(self.storage.root))
        if r.dry_run:  # nothing was removed by age: count it as if
            used -= r.bytes
            pct = 100.0 * used / room if room else 0.0
        r.disk_used_before = pct
        if pct <= rc.high_watermark:
            r.watermark = "below"
            return
        need = used - rc.low_watermark / 100.0 * room
        allowed = {k for k in KINDS if getattr(rc, k).by_watermark}
        log.info(
            "retention: the disk is %.1f %% used, above high_watermark %g %%: freeing %s to reach %g %%",
            pct,
            rc.high_watermark,
            units.size(need),
            rc.low_watermark,
        )
        freed = 0
        for c in candidates:
            if freed >= need or self._stop_here(r):
                break
            if c.id in done or c.id in blocked:
                continue
            if c.kind not in allowed:
                r.not_by_watermark += 1
                r.not_by_watermark_bytes += c.size
                continue
            freed += self._consider(c, f"disk above {rc.high_watermark:g} %", protected, blocked, done, r)
        if freed >= need:
            r.watermark = "reached"
            return
        r.watermark = "not reached"
        if r.interrupted:
            return
        kept: dict[str, int] = {}
        kept_bytes = 0
        for c in candidates:
            if c.id in blocked:
                kept[blocked[c.id]] = kept.get(blocked[c.id], 0) + 1
                kept_bytes += c.size
        why = ", ".join(f"{n} {REASONS[k]}" for k, n in sorted(kept.items())) or "none"
        log.warning(
            "retention: cannot bring the disk down to low_watermark %g %% (%.1f %% used, %s freed of %s needed): "
            "everything left is protected: %d series (%s) kept: %s; %d series (%s) not deleted because their "
            "kind has by_watermark = false",
            rc.low_watermark,
            pct - 100.0 * freed / room if room else pct,
            units.size(freed),
            units.size(need),
            sum(kept.values()),
            units.size(kept_bytes),
            why,
            r.not_by_watermark,
            units.size(r.not_by_watermark_bytes),
        )

    def _prune_history(self, r: RetentionReport) -> None:
        days = self.cfg.retention.delivery_history_days
        if not days:
            return
        cutoff = r.started_at - dt.timedelta(days=days)
        cond = and_(_d.c.instance_fk.is_(None), _d.c.updated_at < cutoff, _d.c.state.not_in(sorted(DELIVERY_IN_FLIGHT)))
        if r.dry_run:
            with self.reader.connect() as conn:
                r.pruned_deliveries = int(conn.execute(select(func.count()).where(cond)).scalar() or 0)
            return
        for _ in range(100_000):  # bounded: each round removes PRUNE_CHUNK rows or ends the loop
            with self.engine.begin() as conn:
                ids = list(conn.execute(select(_d.c.id).where(cond).limit(PRUNE_CHUNK)).scalars())
                if ids:
                    r.pruned_deliveries += conn.execute(delete(_d).where(_d.c.id.in_(ids))).rowcount
            if len(ids) < PRUNE_CHUNK or self._stop_here(r):
                break

    def _sweep(self, r: RetentionReport) -> None:
        """Remove the rows of series left without instances once nothing refers to them."""
        with self.reader.connect() as conn:
            if r.dry_run:
                r.series_rows_removed = int(conn.execute(select(func.count()).where(_row_removable())).scalar() or 0)
                return
            ids = list(conn.execute(select(_s.c.id).where(_row_removable()).order_by(_s.c.id)).scalars())
        for sid in ids:
            if self._stop_here(r):
                break
            with self.engine.begin() as conn:
                series, studies, patients = drop_series_row(conn, sid)  # checks again under the lock
            r.series_rows_removed += series
            r.studies_removed += studies
            r.patients_removed += patients

    def _log(self, r: RetentionReport) -> None:
        blocked = sum(r.blocked.values())
        if not (r.series or r.pruned_deliveries or r.series_rows_removed or blocked or r.errors):
            log.debug("retention: nothing to do")
            return
        log.info(
            "retention%s: %s %d series (%d sources, %d outputs, %d priors; %d instances, %s%s), %d by age, %d for the "
            "watermark; %d delivery rows pruned; %d empty series, %d study and %d patient rows removed; "
            "%d due series kept as protected",
            " (dry run)" if r.dry_run else "",
            "would delete" if r.dry_run else "deleted",
            r.series,
            r.deleted["sources"].series,
            r.deleted["outputs"].series,
            r.deleted["priors"].series,
            r.instances,
            units.size(r.bytes),
            "" if r.dry_run else " freed",
            r.by_age,
            r.by_watermark,
            r.pruned_deliveries,
            r.series_rows_removed,
            r.studies_removed,
            r.patients_removed,
            blocked,
        )
