"""Durable jobs: made once per (series revision, rule, action), claimed, finished, retried, recovered.

"Exactly once" is the table's unique constraint on (series, revision, rule,
action index), not a hope: making the jobs of a revision twice (a restart
between its stability and its trigger, say) inserts nothing the second
time. State changes are conditional UPDATEs (``WHERE state = 'running'``),
so a job cancelled from the command line while it runs stays cancelled.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, or_, select, update
from sqlalchemy.exc import IntegrityError

from node import audit
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
                    _job.insert().returning(_job.c.id),
                    dict(
                        series_fk=series_id,
                        revision=revision,
                        rule=j.rule,
                        action_index=j.action_index,
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
                    ),
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


def claim_next(engine: Engine, now: dt.datetime | None = None) -> ClaimedJob | None:
    """Take the most urgent due pending job (state -> running), or None."""
    now = now or utcnow()
    with engine.begin() as conn:
        row = conn.execute(
            select(_job)
            .where(_job.c.state == JobState.PENDING, _job.c.not_before <= now, ~_waits_for_others)
            .order_by(_job.c.priority.desc(), _job.c.id)
            .limit(1)
        ).first()
        if row is None:
            return None
        done = conn.execute(
            update(_job)
            .where(_job.c.id == row.id, _job.c.state == JobState.PENDING)
            .values(state=JobState.RUNNING, attempts=_job.c.attempts + 1, started_at=now, finished_at=None)
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
    )


def next_due(engine: Engine) -> dt.datetime | None:
    """When the earliest pending job becomes due (None when there is none)."""
    with engine.connect() as conn:
        value = conn.execute(
            select(_job.c.not_before).where(_job.c.state == JobState.PENDING).order_by(_job.c.not_before).limit(1)
        ).scalar()
    return None if value is None else aware(value)


def finish(
    engine: Engine, job_id: int, *, ok: bool, result: str = "", error: str = "", retry_at: dt.datetime | None = None
) -> str:
    """Record a run's end; returns the job's new state ("cancelled" if it was cancelled meanwhile)."""
    now = utcnow()
    if ok:
        values: dict[str, Any] = dict(state=JobState.SUCCEEDED, result=result, last_error="", finished_at=now)
    elif retry_at is not None:
        values = dict(state=JobState.PENDING, last_error=error, not_before=retry_at, finished_at=now)
    else:
        values = dict(state=JobState.FAILED, last_error=error, finished_at=now)
    with engine.begin() as conn:
        done = conn.execute(update(_job).where(_job.c.id == job_id, _job.c.state == JobState.RUNNING).values(**values))
        if done.rowcount == 1:
            return str(values["state"])
        return str(conn.execute(select(_job.c.state).where(_job.c.id == job_id)).scalar() or "missing")


def requeue_running(engine: Engine) -> list[tuple[int, str, int]]:
    """At start-up: jobs left running by a process that died are pending again. Returns (id, rule, attempts)."""
    with engine.begin() as conn:
        rows = conn.execute(
            select(_job.c.id, _job.c.rule, _job.c.attempts).where(_job.c.state == JobState.RUNNING)
        ).all()
        if rows:
            conn.execute(
                update(_job)
                .where(_job.c.state == JobState.RUNNING)
                .values(
                    state=JobState.PENDING,
                    not_before=utcnow(),
                    last_error="the node stopped while this job was running; taken up again",
                )
            )
    return [(r.id, r.rule, r.attempts) for r in rows]


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
            .values(state=JobState.CANCELLED, finished_at=utcnow(), last_error=why)
        )
        _audit_operator(conn, "job_cancel", job_id, row, actor)
        return str(state)
