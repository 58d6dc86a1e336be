"""The durable forward queue: one ``delivery`` row per (instance, destination).

Every state change is a conditional UPDATE on the row's current state, so
an operator's ``cancel`` while a row is being sent is not undone by the
sender, and a second node process could never claim the same row twice.
Delivery is at least once: rows left ``sending`` by a process that died are
queued again at start-up, and a PACS keeps one copy of a SOP Instance UID.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, bindparam, func, or_, select, update

from node import audit
from node.index.models import Delivery, DestinationCircuit, Instance, aware, utcnow
from node.index.read import delivery_selection
from node.index.states import (
    DELIVERY_RETRYABLE,
    CommitmentState,
    DeliveryState,
    delivery_in_flight,
    delivery_not_arrived,
)

#: The due time an operator's retry gives: earlier than anything else, so the sender also tries at
#: once when the destination's circuit is open (see Breaker).
FORCED = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

_d = Delivery.__table__
_i = Instance.__table__
_c = DestinationCircuit.__table__


@dataclass(frozen=True)
class Enqueued:
    new: int = 0
    #: Failed or cancelled rows queued again (a retried job asks for them once more).
    requeued: int = 0
    #: Already queued, being sent or delivered: left as they are.
    already: int = 0


def enqueue(
    conn: Connection,
    instance_ids: Sequence[int],
    destinations: Iterable[str],
    *,
    job_id: int | None = None,
    priority: int = 0,
) -> Enqueued:
    """Queue instances (in the order given, which is the order they are sent in) for each destination."""
    now = utcnow()
    new = requeued = already = 0
    if not instance_ids:
        return Enqueued()
    info = {
        r.id: r
        for r in conn.execute(
            select(_i.c.id, _i.c.series_fk, _i.c.sop_instance_uid).where(_i.c.id.in_(list(instance_ids)))
        )
    }
    for dest in destinations:
        existing = {
            r.instance_fk: r
            for r in conn.execute(
                select(_d.c.id, _d.c.instance_fk, _d.c.state).where(
                    _d.c.destination == dest, _d.c.instance_fk.in_(list(instance_ids))
                )
            )
        }
        rows = []
        again = []
        for pk in instance_ids:
            if pk not in info:
                continue
            old = existing.get(pk)
            if old is None:
                r = info[pk]
                rows.append(
                    dict(
                        instance_fk=pk,
                        series_fk=r.series_fk,
                        job_fk=job_id,
                        destination=dest,
                        sop_instance_uid=r.sop_instance_uid,
                        priority=priority,
                        state=DeliveryState.QUEUED,
                        attempts=0,
                        next_attempt_at=now,
                        last_error="",
                        warning="",
                        sent_transfer_syntax="",
                        created_at=now,
                        updated_at=now,
                        commitment=CommitmentState.NONE,
                        commitment_uid="",
                    )
                )
            elif old.state in DELIVERY_RETRYABLE:
                again.append(old.id)
            else:
                already += 1
        if rows:
            conn.execute(_d.insert(), rows)
            new += len(rows)
        if again:
            requeued += conn.execute(
                update(_d)
                .where(_d.c.id.in_(again), _d.c.state.in_(sorted(DELIVERY_RETRYABLE)))
                .values(
                    state=DeliveryState.QUEUED,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                    attempts=0,
                    commitment=CommitmentState.NONE,
                    commitment_uid="",
                    job_fk=job_id if job_id is not None else _d.c.job_fk,
                )
            ).rowcount
    return Enqueued(new, requeued, already)


@dataclass(frozen=True)
class Item:
    """A claimed delivery with what the sender needs to know about its instance."""

    id: int
    instance_id: int | None
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: str
    attempts: int
    created_at: dt.datetime
    #: The job that queued it (None for none); the stored file's size, for the sent-bytes metric.
    job_id: int | None = None
    file_size: int = 0


def claim(engine: Engine, destination: str, limit: int, now: dt.datetime | None = None) -> list[Item]:
    """Take up to ``limit`` due queued deliveries for a destination, most urgent first, in queue order."""
    now = now or utcnow()
    with engine.begin() as conn:
        rows = conn.execute(
            select(
                _d.c.id,
                _d.c.instance_fk,
                _d.c.sop_instance_uid,
                _d.c.attempts,
                _d.c.created_at,
                _d.c.job_fk,
                _i.c.sop_class_uid,
                _i.c.transfer_syntax_uid,
                _i.c.file_path,
                _i.c.file_size,
            )
            .select_from(_d.outerjoin(_i, _i.c.id == _d.c.instance_fk))
            .where(_d.c.destination == destination, _d.c.state == DeliveryState.QUEUED, _d.c.next_attempt_at <= now)
            .order_by(_d.c.priority.desc(), _d.c.id)
            .limit(limit)
        ).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        # A row cancelled between the SELECT and the UPDATE is not ours.
        taken = set(
            conn.execute(
                update(_d)
                .where(_d.c.id.in_(ids), _d.c.state == DeliveryState.QUEUED)
                .values(state=DeliveryState.SENDING, attempts=_d.c.attempts + 1, updated_at=now)
                .returning(_d.c.id)
            ).scalars()
        )
    return [
        Item(
            r.id,
            r.instance_fk,
            r.sop_instance_uid,
            r.sop_class_uid or "",
            r.transfer_syntax_uid or "",
            r.file_path or "",
            r.attempts + 1,
            aware(r.created_at),
            r.job_fk,
            r.file_size or 0,
        )
        for r in rows
        if r.id in taken
    ]


@dataclass(frozen=True)
class Outcome:
    """What became of one sent item."""

    id: int
    #: delivered, failed or queued (again, at ``retry_at``).
    state: DeliveryState
    status: int | None = None
    error: str = ""
    warning: str = ""
    sent_syntax: str = ""
    retry_at: dt.datetime | None = None
    #: Whether this try counts as an attempt (items never tried because the association ended do not).
    attempted: bool = True
    #: Storage Commitment transaction asked for with this delivery ("" for none).
    commitment_uid: str = ""
    #: For the audit trail of delivered and failed items: where to, what, for which job.
    destination: str = ""
    sop_instance_uid: str = ""
    job_id: int | None = None


def record(engine: Engine, outcomes: Sequence[Outcome]) -> None:
    """Write the outcomes of a batch in one transaction (only for rows still ``sending``).

    Deliveries and permanent failures are audited in the same transaction, as they happened (a row
    cancelled meanwhile was still delivered).
    """
    if not outcomes:
        return
    now = utcnow()
    events = [
        audit.row(
            "delivered" if o.state == DeliveryState.DELIVERED else "delivery_failed",
            at=now,
            actor="node",
            destination=o.destination,
            sop_instance_uid=o.sop_instance_uid,
            job_id=o.job_id,
            status=o.status,
            detail=(o.warning or (f"sent as {o.sent_syntax}" if o.sent_syntax else ""))
            if o.state == DeliveryState.DELIVERED
            else o.error,
        )
        for o in outcomes
        if o.state in (DeliveryState.DELIVERED, DeliveryState.FAILED)
    ]
    with engine.begin() as conn:
        audit.record_many(conn, events)
        delivered = [o for o in outcomes if o.state == DeliveryState.DELIVERED]
        if delivered:
            conn.execute(
                update(_d)
                .where(
                    _d.c.id == bindparam("b_id"),
                    # Not IN (...): an expanding parameter cannot be used with executemany.
                    or_(_d.c.state == DeliveryState.SENDING, _d.c.state == DeliveryState.CANCELLED),
                )
                .values(
                    state=DeliveryState.DELIVERED,
                    last_status=bindparam("b_status"),
                    last_error=bindparam("b_error"),
                    warning=bindparam("b_warning"),
                    sent_transfer_syntax=bindparam("b_syntax"),
                    delivered_at=now,
                    updated_at=now,
                    commitment=bindparam("b_commitment"),
                    commitment_uid=bindparam("b_uid"),
                    commitment_at=None,
                ),
                [
                    dict(
                        b_id=o.id,
                        b_status=o.status,
                        b_warning=o.warning[:256],
                        b_syntax=o.sent_syntax,
                        b_commitment=CommitmentState.REQUESTED
                        if o.commitment_uid
                        else CommitmentState.FAILED
                        if o.error
                        else CommitmentState.NONE,
                        b_uid=o.commitment_uid,
                        b_error=o.error,
                    )
                    for o in delivered
                ],
            )
        for o in outcomes:
            if o.state == DeliveryState.DELIVERED:
                continue
            values: dict[str, Any] = dict(state=o.state, last_status=o.status, last_error=o.error, updated_at=now)
            if o.state == DeliveryState.QUEUED:
                values["next_attempt_at"] = o.retry_at or now
                if not o.attempted:
                    values["attempts"] = _d.c.attempts - 1
            conn.execute(update(_d).where(_d.c.id == o.id, _d.c.state == DeliveryState.SENDING).values(**values))


def release(engine: Engine, ids: Sequence[int], why: str) -> int:
    """Put claimed rows back (an internal error while sending them): due again a little later."""
    at = utcnow() + dt.timedelta(seconds=30)
    with engine.begin() as conn:
        return conn.execute(
            update(_d)
            .where(_d.c.id.in_(list(ids)), _d.c.state == DeliveryState.SENDING)
            .values(state=DeliveryState.QUEUED, next_attempt_at=at, updated_at=utcnow(), last_error=why)
        ).rowcount


def postpone(engine: Engine, destination: str, until: dt.datetime, *, forced_too: bool = False) -> int:
    """While a destination is in back-off, what is queued for it waits until then.

    An operator's retry (due at FORCED) is left due unless ``forced_too``: the sender passes that once
    the retry has been tried and failed.
    """
    cond = [_d.c.destination == destination, _d.c.state == DeliveryState.QUEUED, _d.c.next_attempt_at < until]
    if not forced_too:
        cond.append(_d.c.next_attempt_at > FORCED)
    with engine.begin() as conn:
        return conn.execute(update(_d).where(*cond).values(next_attempt_at=until)).rowcount


def requeue_sending(engine: Engine) -> int:
    """At start-up: deliveries left ``sending`` by a process that died are queued again."""
    with engine.begin() as conn:
        return conn.execute(
            update(_d)
            .where(_d.c.state == DeliveryState.SENDING)
            .values(
                state=DeliveryState.QUEUED,
                next_attempt_at=utcnow(),
                updated_at=utcnow(),
                last_error="the node stopped while this was being sent; sending it again",
            )
        ).rowcount


def next_due(engine: Engine, destination: str) -> dt.datetime | None:
    with engine.connect() as conn:
        value = conn.execute(
            select(func.min(_d.c.next_attempt_at)).where(
                _d.c.destination == destination, _d.c.state == DeliveryState.QUEUED
            )
        ).scalar()
    return None if value is None else aware(value)


# --- circuit breakers ----------------------------------------------------------


@dataclass(frozen=True)
class Circuit:
    """A destination's stored circuit: consecutive transient failures and when to try again."""

    failures: int = 0
    #: No attempt before this (UTC); None when the circuit is closed.
    retry_at: dt.datetime | None = None
    last_error: str = ""


def load_circuits(engine: Engine, destinations: Sequence[str]) -> dict[str, Circuit]:
    """At start-up: each destination's circuit as the last run left it (a closed one is made where none is)."""
    now = utcnow()
    with engine.begin() as conn:
        rows = {r.destination: r for r in conn.execute(select(_c).where(_c.c.destination.in_(list(destinations))))}
        missing = [d for d in destinations if d not in rows]
        if missing:
            conn.execute(
                _c.insert(),
                [dict(destination=d, failures=0, retry_at=None, last_error="", updated_at=now) for d in missing],
            )
    out = {d: Circuit() for d in destinations}
    for d, r in rows.items():
        out[d] = Circuit(r.failures, aware(r.retry_at) if r.retry_at else None, r.last_error)
    return out


def save_circuit(engine: Engine, destination: str, circuit: Circuit) -> None:
    """Record a destination's circuit (its row exists: :func:`load_circuits` made it)."""
    with engine.begin() as conn:
        conn.execute(
            update(_c)
            .where(_c.c.destination == destination)
            .values(
                failures=circuit.failures, retry_at=circuit.retry_at, last_error=circuit.last_error, updated_at=utcnow()
            )
        )


# --- Storage Commitment ------------------------------------------------------


def commitment_result(
    engine: Engine, transaction_uid: str, committed: Iterable[str], failed: dict[str, str]
) -> tuple[int, list[int]]:
    """Record a Storage Commitment report; returns (committed count, ids of failed deliveries)."""
    now = utcnow()
    committed = list(committed)
    with engine.begin() as conn:
        n = 0
        if committed:
            n = conn.execute(
                update(_d)
                .where(
                    _d.c.commitment_uid == transaction_uid,
                    _d.c.sop_instance_uid.in_(committed),
                    _d.c.commitment == CommitmentState.REQUESTED,
                )
                .values(commitment=CommitmentState.COMMITTED, commitment_at=now, updated_at=now)
            ).rowcount
        bad = []
        for uid, why in failed.items():
            row = conn.execute(
                select(_d.c.id).where(
                    _d.c.commitment_uid == transaction_uid,
                    _d.c.sop_instance_uid == uid,
                    _d.c.commitment == CommitmentState.REQUESTED,
                )
            ).first()
            if row is None:
                continue
            conn.execute(
                update(_d)
                .where(_d.c.id == row.id)
                .values(commitment=CommitmentState.FAILED, commitment_at=now, updated_at=now, last_error=why)
            )
            bad.append(row.id)
    return n, bad


def commitment_overdue(engine: Engine, destination: str, older_than: dt.datetime) -> list[int]:
    """Deliveries whose commitment was asked for before ``older_than`` and never answered."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(_d.c.id).where(
                    _d.c.destination == destination,
                    _d.c.state == DeliveryState.DELIVERED,
                    _d.c.commitment == CommitmentState.REQUESTED,
                    _d.c.delivered_at < older_than,
                )
            ).scalars()
        )


def resend(engine: Engine, ids: Sequence[int], reason: str, at: dt.datetime | None = None) -> int:
    """Queue delivered rows again (commitment failed or never confirmed)."""
    if not ids:
        return 0
    now = utcnow()
    with engine.begin() as conn:
        return conn.execute(
            update(_d)
            .where(_d.c.id.in_(list(ids)), _d.c.state == DeliveryState.DELIVERED)
            .values(
                state=DeliveryState.QUEUED,
                next_attempt_at=at or now,
                updated_at=now,
                last_error=reason,
                commitment=CommitmentState.NONE,
                commitment_uid="",
            )
        ).rowcount


# --- operators ----------------------------------------------------------------


def _operator_event(
    conn: Connection,
    kind: str,
    actor: str,
    n: int,
    destination: str | None,
    ids: Sequence[int] | None,
    series_uid: str | None,
    what: str,
) -> None:
    selection = [f"delivery ids {', '.join(map(str, ids))}"] if ids else []
    if not destination and not ids and not series_uid:
        selection.append("all destinations")
    detail = f"{n} {what}" + (f" ({'; '.join(selection)})" if selection else "")
    audit.record(conn, kind, actor=actor, destination=destination or "", series_uid=series_uid or "", detail=detail)


def _operator_update(
    engine: Engine,
    kind: str,
    only: ColumnElement[bool],
    values: dict[str, Any],
    what: str,
    *,
    actor: str,
    destination: str | None,
    ids: Sequence[int] | None,
    series_uid: str | None,
) -> int:
    """Set ``values`` on the selected deliveries (destination, ids, series UID) that satisfy ``only`` and audit it
    as ``kind`` done by ``actor`` (``what``: the change in words): how an operator's retry or cancel changes the queue."""
    sel = delivery_selection(destination, None, ids, series_uid)
    with engine.begin() as conn:
        n = conn.execute(update(_d).where(only if sel is None else and_(sel, only)).values(values)).rowcount
        _operator_event(conn, kind, actor, n, destination, ids, series_uid, what)
        return n


def retry(
    engine: Engine,
    *,
    destination: str | None = None,
    ids: Sequence[int] | None = None,
    series_uid: str | None = None,
    include_cancelled: bool = True,
    actor: str = "cli",
) -> int:
    """Queue failed (and cancelled) deliveries again, due now, with a fresh give-up clock.

    ``actor`` (who asked: "cli", or the web user's name) goes into the audit trail.
    """
    states = sorted(DELIVERY_RETRYABLE) if include_cancelled else [DeliveryState.FAILED]
    now = utcnow()
    return _operator_update(
        engine,
        "queue_retry",
        _d.c.state.in_(states),
        {
            "state": DeliveryState.QUEUED,
            "next_attempt_at": FORCED,
            "created_at": now,
            "updated_at": now,
            "commitment": CommitmentState.NONE,
            "commitment_uid": "",
        },
        "failed or cancelled deliveries queued again" if include_cancelled else "failed deliveries queued again",
        actor=actor,
        destination=destination,
        ids=ids,
        series_uid=series_uid,
    )


def retry_now(engine: Engine, destination: str | None = None, *, actor: str = "cli") -> int:
    """Make waiting queued deliveries due now (after a PACS outage was fixed)."""
    now = utcnow()
    cond = _d.c.state == DeliveryState.QUEUED
    if destination:
        cond = and_(cond, _d.c.destination == destination)
    with engine.begin() as conn:
        n = conn.execute(
            update(_d).where(cond, _d.c.next_attempt_at > now).values(next_attempt_at=FORCED, updated_at=now)
        ).rowcount
        if n:  # also run after every ``queue retry``; nothing waiting is nothing to record
            _operator_event(
                conn, "queue_retry_now", actor, n, destination, None, None, "waiting deliveries made due now"
            )
        return n


def cancel(
    engine: Engine,
    *,
    destination: str | None = None,
    ids: Sequence[int] | None = None,
    series_uid: str | None = None,
    actor: str = "cli",
) -> int:
    """Cancel queued (and in-flight) deliveries; an instance already on the wire may still arrive."""
    return _operator_update(
        engine,
        "queue_cancel",
        delivery_in_flight(_d),
        {
            "state": DeliveryState.CANCELLED,
            "updated_at": utcnow(),
            "last_error": func.trim(func.coalesce(_d.c.last_error, "") + " (cancelled by an operator)"),
        },
        "deliveries cancelled",
        actor=actor,
        destination=destination,
        ids=ids,
        series_uid=series_uid,
    )


def unfinished_for_series(conn: Connection, series_id: int, revision: int | None = None) -> list[tuple[str, str, int]]:
    """Deliveries of a series' instances that have not (yet) arrived, as (state, destination, count)."""
    cond = [_d.c.series_fk == series_id, delivery_not_arrived(_d)]
    if revision is not None:
        cond.append(_d.c.instance_fk.in_(select(_i.c.id).where(_i.c.series_fk == series_id, _i.c.revision == revision)))
    rows = conn.execute(
        select(_d.c.state, _d.c.destination, func.count()).where(*cond).group_by(_d.c.state, _d.c.destination)
    )
    return [(state, destination, count) for state, destination, count in rows]
