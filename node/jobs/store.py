"""Durable jobs: made once per (series revision, rule, action), claimed, finished, retried, taken over.

"Exactly once" is the table's unique constraint on (series, revision, rule,
action index, run), not a hope: making the jobs of a revision twice (a restart
between its stability and its trigger, say) inserts nothing the second
time. ``run`` is 1 for what the rules made; only an operator's rerun
(:func:`rerun`, :func:`rerun_jobs`) adds the next run of a match, as a row of
its own, so the earlier run (its state, plugin versions, outputs) is kept.

Several node processes may share the table (node.index.cluster). A claim sets
``owner`` to the claiming process in the same UPDATE that makes the job
``running``; every later change by that process is conditional on
``state = 'running' AND owner = <it>``, so a job cancelled from the command line
while it runs stays cancelled, and a job another process took over (because its
owner's lease ran out) is not overwritten by the late owner. Only jobs whose
owner is gone are taken over (:func:`take_over`), never a live process's.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from node import audit
from node.index.cluster import owner_gone
from node.index.models import Delivery, Job, Series, aware, utcnow
from node.index.states import JOB_ACTIVE, JOB_RETRYABLE, JobState, delivery_settling, job_active

_job = Job.__table__
_series = Series.__table__


@dataclass(frozen=True)
class NewJob:
    rule: str
    action_index: int
    kind: str
    action: dict[str, Any]
    priority: int = 0
    max_attempts: int = 3


def _job_row(series_id: int, revision: int, j: NewJob, now: dt.datetime, run: int = 1) -> dict[str, Any]:
    """The columns of a new pending job (one place for the tracker's jobs and an operator's reruns)."""
    return dict(
        series_fk=series_id,
        revision=revision,
        rule=j.rule,
        action_index=j.action_index,
        run=run,
        kind=j.kind,
        action=json.dumps(j.action, sort_keys=True),
        priority=j.priority,
        state=JobState.PENDING,
        attempts=0,
        max_attempts=j.max_attempts,
        last_error="",
        result="",
        created_at=now,
        not_before=now,
    )


def create_jobs(
    conn: Connection, series_id: int, revision: int, jobs: list[NewJob], *, series_uid: str = "", study_uid: str = ""
) -> list[int]:
    """Insert the jobs of one revision that do not exist yet; returns the ids of those inserted.

    Each job made is audited (``job_created``) in the same transaction, under the UIDs given.
    """
    existing = set(
        conn.execute(
            select(_job.c.rule, _job.c.action_index).where(_job.c.series_fk == series_id, _job.c.revision == revision)
        ).all()
    )
    now = utcnow()
    ids = []
    for j in jobs:
        if (j.rule, j.action_index) in existing:
            continue
        try:
            with conn.begin_nested():
                pk = conn.execute(
                    _job.insert().returning(_job.c.id), _job_row(series_id, revision, j, now)
                ).scalar_one()
        except IntegrityError:  # made meanwhile by another process: the constraint did its job
            continue
        ids.append(pk)
        audit.record(
            conn,
            "job_created",
            actor="node",
            rule=j.rule,
            job_id=pk,
            series_uid=series_uid,
            study_uid=study_uid,
            detail=f"revision {revision}, action {j.action_index} ({j.kind})",
        )
    return ids


_other = _job.alias("other")
_delivery = Delivery.__table__
#: A discard waits until every other job of the series has finished and its deliveries have arrived
#: (and been committed, where asked): "forward, then discard" must not delete what is still being sent.
_waits_for_others = and_(
    _job.c.kind == "discard",
    or_(
        exists().where(
            _other.c.series_fk == _job.c.series_fk,
            _other.c.id != _job.c.id,
            _other.c.kind != "discard",
            job_active(_other),
        ),
        exists().where(_delivery.c.series_fk == _job.c.series_fk, delivery_settling(_delivery)),
    ),
)


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    series_id: int
    revision: int
    rule: str
    action_index: int
    kind: str
    action: dict[str, Any]
    attempts: int
    max_attempts: int
    #: Higher first (node.decide.rules.URGENT added for an urgent job); also orders waiting for a GPU.
    priority: int = 0
    #: 1 as the rules made it; 2, 3, ... for an operator's reruns (their outputs get UIDs of their own).
    run: int = 1


def claim_next(engine: Engine, owner: str, now: dt.datetime | None = None) -> ClaimedJob | None:
    """Take the most urgent due pending job for process ``owner`` (state -> running), or None.

    On PostgreSQL the candidate is selected ``FOR UPDATE SKIP LOCKED``: processes claiming at the same
    time each get a different job instead of queueing behind one row lock and then finding it gone.
    (SQLite ignores it; its ``BEGIN IMMEDIATE`` already lets one writer in at a time.)
    """
    now = now or utcnow()
    with engine.begin() as conn:
        row = conn.execute(
            select(_job)
            .where(_job.c.state == JobState.PENDING, _job.c.not_before <= now, ~_waits_for_others)
            .order_by(_job.c.priority.desc(), _job.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if row is None:
            return None
        done = conn.execute(
            update(_job)
            .where(_job.c.id == row.id, _job.c.state == JobState.PENDING)
            .values(state=JobState.RUNNING, owner=owner, attempts=_job.c.attempts + 1, started_at=now, finished_at=None)
        )
        if done.rowcount != 1:
            return None
    return ClaimedJob(
        row.id,
        row.series_fk,
        row.revision,
        row.rule,
        row.action_index,
        row.kind,
        json.loads(row.action),
        row.attempts + 1,
        row.max_attempts,
        row.priority,
        row.run,
    )


def next_due(engine: Engine) -> dt.datetime | None:
    """When the earliest pending job becomes due (None when there is none)."""
    with engine.connect() as conn:
        value = conn.execute(
            select(_job.c.not_before).where(_job.c.state == JobState.PENDING).order_by(_job.c.not_before).limit(1)
        ).scalar()
    return None if value is None else aware(value)


@dataclass(frozen=True)
class Finished:
    """What :func:`finish` recorded: the job's state now, and whether it was this run's outcome."""

    state: str
    #: False: the job was no longer this process's running job (cancelled, or taken over by another
    #: process after this one's lease ran out); ``state`` and ``owner`` then say what it is now.
    recorded: bool
    #: The process that holds the job now (None unless it is running elsewhere).
    owner: str | None = None


def finish(
    engine: Engine,
    job_id: int,
    owner: str,
    *,
    ok: bool,
    result: str = "",
    error: str = "",
    retry_at: dt.datetime | None = None,
) -> Finished:
    """Record the end of ``owner``'s run of a job, if the job is still that run's.

    A job cancelled meanwhile, or taken over by another process, is left as it is: the late outcome of
    this run is not written over what happened since.
    """
    now = utcnow()
    if ok:
        values: dict[str, Any] = dict(state=JobState.SUCCEEDED, result=result, last_error="", finished_at=now)
    elif retry_at is not None:
        values = dict(state=JobState.PENDING, last_error=error, not_before=retry_at, finished_at=now)
    else:
        values = dict(state=JobState.FAILED, last_error=error, finished_at=now)
    with engine.begin() as conn:
        done = conn.execute(
            update(_job)
            .where(_job.c.id == job_id, _job.c.state == JobState.RUNNING, _job.c.owner == owner)
            .values(owner=None, **values)
        )
        if done.rowcount == 1:
            return Finished(str(values["state"]), True)
        now_row = conn.execute(select(_job.c.state, _job.c.owner).where(_job.c.id == job_id)).first()
    if now_row is None:
        return Finished("missing", False)
    return Finished(str(now_row.state), False, now_row.owner)


def defer(engine: Engine, job_id: int, owner: str, *, note: str, until: dt.datetime) -> Finished:
    """Put ``owner``'s running job back to pending until ``until`` without counting the attempt.

    For a job that waits for something outside the node (a source PACS for priors) with its own deadline:
    the wait is not a failed attempt, so ``max_attempts`` still counts the plugin's real failures.
    ``note`` (what it waits for) is its ``last_error`` meanwhile. Conditional like :func:`finish`.
    """
    with engine.begin() as conn:
        done = conn.execute(
            update(_job)
            .where(_job.c.id == job_id, _job.c.state == JobState.RUNNING, _job.c.owner == owner)
            .values(
                owner=None,
                state=JobState.PENDING,
                attempts=_job.c.attempts - 1,
                not_before=until,
                last_error=note,
                finished_at=None,  # it has not finished: it waits
            )
        )
        if done.rowcount == 1:
            return Finished(JobState.PENDING, True)
        now_row = conn.execute(select(_job.c.state, _job.c.owner).where(_job.c.id == job_id)).first()
    if now_row is None:
        return Finished("missing", False)
    return Finished(str(now_row.state), False, now_row.owner)


@dataclass(frozen=True)
class TakenOver:
    """A running job whose process was gone, pending again."""

    id: int
    rule: str
    attempts: int
    #: The process that was running it (None: a row from before owners were recorded).
    owner: str | None


def take_over(engine: Engine, now: dt.datetime | None = None) -> list[TakenOver]:
    """Jobs left running by node processes that are gone are pending again (owner cleared).

    A live process's running jobs are never touched. Each job's ``last_error`` names the process that
    stopped; its next attempt may be its second run, which every handler tolerates.
    """
    now = now or utcnow()
    with engine.begin() as conn:
        rows = conn.execute(
            select(_job.c.id, _job.c.rule, _job.c.attempts, _job.c.owner)
            .where(_job.c.state == JobState.RUNNING, owner_gone(_job.c.owner, now))
            .order_by(_job.c.id)
            .with_for_update(skip_locked=True)
        ).all()
        taken = []
        for r in rows:
            who = f"node process {r.owner}" if r.owner else "the node"
            same_owner = _job.c.owner.is_(None) if r.owner is None else _job.c.owner == r.owner
            done = conn.execute(
                update(_job)
                .where(_job.c.id == r.id, _job.c.state == JobState.RUNNING, same_owner)
                .values(
                    state=JobState.PENDING,
                    owner=None,
                    not_before=now,
                    last_error=f"{who} stopped while this job was running; taken up again",
                )
            )
            if done.rowcount == 1:
                taken.append(TakenOver(r.id, r.rule, r.attempts, r.owner))
    return taken


class JobStateError(ValueError):
    pass


def _operator_row(conn: Connection, job_id: int, *columns: Any) -> Any:
    """The job an operator acts on: its state, rule and series and the ``columns`` the change needs."""
    row = conn.execute(select(_job.c.state, _job.c.rule, _job.c.series_fk, *columns).where(_job.c.id == job_id)).first()
    if row is None:
        raise JobStateError(f"there is no job {job_id}")
    return row


def _audit_operator(conn: Connection, kind: str, job_id: int, row: Any, actor: str) -> None:
    """Audit an operator's change of a job: who, which job, its rule and series, the state it was in."""
    series_uid = conn.execute(select(_series.c.series_instance_uid).where(_series.c.id == row.series_fk)).scalar()
    audit.record(
        conn,
        kind,
        actor=actor,
        job_id=job_id,
        rule=row.rule,
        series_uid=str(series_uid or ""),
        detail=f"was {row.state}",
    )


def retry(engine: Engine, job_id: int, *, actor: str = "cli") -> None:
    """Run a failed or cancelled job again (one more attempt allowed); audited as done by ``actor``."""
    with engine.begin() as conn:
        row = _operator_row(conn, job_id, _job.c.attempts, _job.c.max_attempts)
        if row.state not in JOB_RETRYABLE:
            raise JobStateError(f"job {job_id} is {row.state}; only failed or cancelled jobs can be retried")
        conn.execute(
            update(_job)
            .where(and_(_job.c.id == job_id, _job.c.state == row.state))
            .values(state=JobState.PENDING, not_before=utcnow(), max_attempts=max(row.max_attempts, row.attempts + 1))
        )
        _audit_operator(conn, "job_retry", job_id, row, actor)


def cancel(engine: Engine, job_id: int, *, actor: str = "cli") -> str:
    """Cancel a pending or running job (a running one finishes its current step; its outcome is ignored).

    Audited as done by ``actor`` ("cli", or the web user's name).
    """
    with engine.begin() as conn:
        row = _operator_row(conn, job_id, _job.c.last_error)
        state = row.state
        if state not in JOB_ACTIVE:
            raise JobStateError(f"job {job_id} is {state}; only pending or running jobs can be cancelled")
        why = "cancelled by an operator" + (f"; the error before: {row.last_error}" if row.last_error else "")
        conn.execute(
            update(_job)
            .where(_job.c.id == job_id, _job.c.state == state)
            .values(state=JobState.CANCELLED, owner=None, finished_at=utcnow(), last_error=why)
        )
        _audit_operator(conn, "job_cancel", job_id, row, actor)
        return str(state)


def _next_run(conn: Connection, series_id: int, revision: int, rule: str, action_index: int) -> int:
    """The run number a new run of this (series revision, rule, action) gets: one past the highest so far."""
    last = conn.execute(
        select(func.max(_job.c.run)).where(
            _job.c.series_fk == series_id,
            _job.c.revision == revision,
            _job.c.rule == rule,
            _job.c.action_index == action_index,
        )
    ).scalar()
    return int(last or 0) + 1


def _refuse_if_active(conn: Connection, series_id: int, revision: int, j: NewJob) -> None:
    """Refuse a rerun while a run of the same match is pending or running: it runs anyway, and two runs
    at once would make two sets of outputs (and send both)."""
    active = conn.execute(
        select(_job.c.id, _job.c.state, _job.c.run)
        .where(
            _job.c.series_fk == series_id,
            _job.c.revision == revision,
            _job.c.rule == j.rule,
            _job.c.action_index == j.action_index,
            job_active(_job),
        )
        .order_by(_job.c.run)
        .limit(1)
    ).first()
    if active is not None:
        raise JobStateError(
            f"job {active.id} is {active.state}; it runs anyway (cancel it first to run it again; it is run "
            f"{active.run} of rule {j.rule}, action {j.action_index} on revision {revision} of this series)"
        )


def _insert_next_run(
    conn: Connection, series_id: int, revision: int, j: NewJob, now: dt.datetime, study_trigger: int | None
) -> tuple[int, int]:
    """Insert ``j`` as the next run of its match; returns (job id, run)."""
    _refuse_if_active(conn, series_id, revision, j)
    tries = 3
    while True:
        run = _next_run(conn, series_id, revision, j.rule, j.action_index)
        values = _job_row(series_id, revision, j, now, run) | {"study_trigger_fk": study_trigger}
        try:
            with conn.begin_nested():
                return int(conn.execute(_job.insert().returning(_job.c.id), values).scalar_one()), run
        except IntegrityError:  # another operator's rerun took this run number meanwhile: the next one
            tries -= 1
            if not tries:
                raise


def rerun_jobs(
    conn: Connection,
    series_id: int,
    revision: int,
    jobs: list[NewJob],
    *,
    actor: str,
    series_uid: str = "",
    study_uid: str = "",
    study_trigger: int | None = None,
) -> list[int]:
    """Make ``jobs`` for a revision again, each as the next run of its match (the earlier runs are kept).

    Unlike :func:`create_jobs` nothing is skipped: an operator asked for these to run (again). But a
    match with a run still pending or running is refused (:class:`JobStateError`, naming that job): it
    runs anyway. The series row is locked first (``FOR UPDATE`` on PostgreSQL; SQLite's write lock does
    it there), so of two operators asking at once the second sees the first one's new run and is refused.
    Each job made is audited (``job_created``, naming the run and who asked) in the caller's transaction.
    ``study_trigger``: a study rule's jobs keep the firing they belong to (their named inputs).
    """
    conn.execute(select(_series.c.id).where(_series.c.id == series_id).with_for_update()).all()
    now = utcnow()
    ids = []
    for j in jobs:
        pk, run = _insert_next_run(conn, series_id, revision, j, now, study_trigger)
        ids.append(pk)
        audit.record(
            conn,
            "job_created",
            actor=actor,
            rule=j.rule,
            job_id=pk,
            series_uid=series_uid,
            study_uid=study_uid,
            detail=f"revision {revision}, action {j.action_index} ({j.kind}), run {run}",
        )
    return ids


def rerun(engine: Engine, job_id: int, *, actor: str = "cli") -> int:
    """Run a finished job (succeeded, failed or cancelled) again as a new job; returns the new job's id.

    The new job is the next run of the same (series revision, rule, action) with the action as the old
    job stored it; a plugin's outputs get new UIDs (the run is part of their identity) and the old job's
    outputs stay. Refused while any run of the match (this job or an earlier rerun of it) is pending or
    running: it is about to run anyway. Audited (``job_rerun``, naming the new job) as done by ``actor``.
    """
    with engine.begin() as conn:
        row = _operator_row(
            conn,
            job_id,
            _job.c.revision,
            _job.c.action_index,
            _job.c.kind,
            _job.c.action,
            _job.c.priority,
            _job.c.max_attempts,
            _job.c.study_trigger_fk,
        )
        job = NewJob(row.rule, row.action_index, row.kind, json.loads(row.action), row.priority, row.max_attempts)
        series_uid = conn.execute(select(_series.c.series_instance_uid).where(_series.c.id == row.series_fk)).scalar()
        (new,) = rerun_jobs(
            conn,
            row.series_fk,
            row.revision,
            [job],
            actor=actor,
            series_uid=str(series_uid or ""),
            study_trigger=row.study_trigger_fk,
        )
        audit.record(
            conn,
            "job_rerun",
            actor=actor,
            job_id=job_id,
            rule=row.rule,
            series_uid=str(series_uid or ""),
            detail=f"was {row.state}; runs again as job {new}",
        )
    return int(new)
