"""The durable forward queue: one ``delivery`` row per (instance, destination).

Every state change is a conditional UPDATE on the row's current state, so
an operator's ``cancel`` while a row is being sent is not undone by the
sender. Several node processes may share the queue (node.index.cluster): a
claim marks the rows with the claiming process as ``owner`` (on PostgreSQL
``FOR UPDATE SKIP LOCKED``, so two processes never claim the same row), and
only that owner's outcome is recorded for them. Delivery is at least once:
rows left ``sending`` by a process that is gone are taken over (:func:`take_over`,
at start and on every heartbeat), and a PACS keeps one copy of a SOP Instance UID.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, bindparam, func, literal, or_, select, update

from node import audit
from node.index.cluster import owner_gone
from node.index.db import insert_or_skip
from node.index.models import Delivery, DestinationCircuit, Instance, Series, aware, utcnow
from node.index.read import delivery_selection
from node.index.states import (
    DELIVERY_RETRYABLE,
    CommitmentState,
    DeliveryState,
    delivery_in_flight,
    delivery_not_arrived,
)

log = logging.getLogger(__name__)

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
    #: Every delivery row of the request (new, queued again and already there), in the order given, per destination.
    ids: tuple[int, ...] = ()
    #: The rows this call queued (new or again): what its caller may cancel without touching others' deliveries.
    queued: tuple[int, ...] = ()
    #: The SOP Instance UID of each row of ``ids``, as it was when queued: a C-MOVE names a row removed
    #: meanwhile (retention, a discard) in its Failed SOP Instance UID List.
    sop_instance_uids: tuple[str, ...] = ()


def enqueue(
    conn: Connection,
    instance_ids: Sequence[int],
    destinations: Iterable[str],
    *,
    job_id: int | None = None,
    priority: int = 0,
    again: bool = False,
) -> Enqueued:
    """Queue instances (in the order given, which is the order they are sent in) for each destination.

    Failed and cancelled rows are queued again (a retried job asks for them once more); with ``again``
    delivered ones too: a C-MOVE asks for another copy of what the destination was sent before.
    """
    now = utcnow()
    new = requeued = already = 0
    requeue = DELIVERY_RETRYABLE | {DeliveryState.DELIVERED} if again else DELIVERY_RETRYABLE
    order: list[int] = []
    queued: list[int] = []
    if not instance_ids:
        return Enqueued()
    uids: list[str] = []
    info = {
        r.id: r
        for chunk in _chunks(instance_ids)
        for r in conn.execute(select(_i.c.id, _i.c.series_fk, _i.c.sop_instance_uid).where(_i.c.id.in_(chunk)))
    }
    for dest in destinations:
        existing = {
            r.instance_fk: r
            for chunk in _chunks(instance_ids)
            for r in conn.execute(
                select(_d.c.id, _d.c.instance_fk, _d.c.state).where(
                    _d.c.destination == dest, _d.c.instance_fk.in_(chunk)
                )
            )
        }
        rows = []
        again_ids = []
        ids: dict[int, int] = {}  # instance id -> its row for dest
        for pk in instance_ids:
            if pk not in info:
                continue
            old = existing.get(pk)
            if old is not None:
                ids[pk] = old.id
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
            elif old.state in requeue:
                again_ids.append(old.id)
            else:
                already += 1
        if rows:
            # Another process's job may queue the same instance for the same destination at this moment:
            # its row wins, ours is no change (a plain INSERT would fail the whole job on the constraint).
            stmt = insert_or_skip(_d, conn.dialect.name, _d.c.instance_fk, _d.c.destination)
            made = conn.execute(stmt.returning(_d.c.id, _d.c.instance_fk), rows).all()
            new += len(made)
            already += len(rows) - len(made)
            ids.update({r.instance_fk: r.id for r in made})
            queued += [r.id for r in made]
            if len(made) < len(rows):  # the other process's rows: ours to follow, not to cancel
                ids.update(_row_ids(conn, dest, [r["instance_fk"] for r in rows if r["instance_fk"] not in ids]))
        for chunk in _chunks(again_ids):
            taken = conn.execute(
                update(_d)
                .where(_d.c.id.in_(chunk), _d.c.state.in_(sorted(requeue)))
                .values(
                    state=DeliveryState.QUEUED,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                    attempts=0,
                    owner=None,
                    commitment=CommitmentState.NONE,
                    commitment_uid="",
                    job_fk=job_id if job_id is not None else _d.c.job_fk,
                )
                .returning(_d.c.id)
            ).scalars()
            mine = set(taken)
            requeued += len(mine)
            queued += [i for i in chunk if i in mine]
        order += [ids[pk] for pk in instance_ids if pk in ids]
        uids += [info[pk].sop_instance_uid for pk in instance_ids if pk in ids]
    return Enqueued(new, requeued, already, tuple(order), tuple(queued), tuple(uids))


def _chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    """``ids`` in lists of at most :data:`_CHUNK`: an IN (...) of each stays below the bound parameter limits
    (PostgreSQL's protocol: 65,535 per statement)."""
    for k in range(0, len(ids), _CHUNK):
        yield list(ids[k : k + _CHUNK])


def _row_ids(conn: Connection, destination: str, instance_ids: Sequence[int]) -> dict[int, int]:
    """{instance id: delivery id} of the rows for ``destination`` (another process's, just made)."""
    return {
        r.instance_fk: r.id
        for chunk in _chunks(instance_ids)
        for r in conn.execute(
            select(_d.c.instance_fk, _d.c.id).where(_d.c.destination == destination, _d.c.instance_fk.in_(chunk))
        )
    }


@dataclass(frozen=True)
class DeliveryStatus:
    """Where one delivery row stands (:func:`states_of`): what a C-MOVE reports to its requestor."""

    id: int
    state: DeliveryState
    sop_instance_uid: str
    #: Delivered with a warning status from the destination (e.g. 0xB000: coerced).
    warning: bool
    last_error: str


def states_of(conn: Connection, ids: Sequence[int]) -> list[DeliveryStatus]:
    """The states of the delivery rows ``ids`` (rows gone meanwhile are left out), in chunks of bound parameters."""
    out: list[DeliveryStatus] = []
    for chunk in _chunks(ids):
        rows = conn.execute(
            select(_d.c.id, _d.c.state, _d.c.sop_instance_uid, _d.c.warning, _d.c.last_error).where(_d.c.id.in_(chunk))
        )
        out += [
            DeliveryStatus(r.id, DeliveryState(r.state), r.sop_instance_uid, bool(r.warning), r.last_error or "")
            for r in rows
        ]
    return out


#: Ids per IN (...) of :func:`states_of`: well below SQLite's and PostgreSQL's bound parameter limits.
_CHUNK = 5000


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


def claim(engine: Engine, destination: str, limit: int, owner: str, now: dt.datetime | None = None) -> list[Item]:
    """Take up to ``limit`` due queued deliveries for a destination, most urgent first, in queue order.

    ``owner`` (this process's id) is written in the claiming UPDATE: only it may record their outcome.
    On PostgreSQL the candidates are locked with SKIP LOCKED, so processes claiming at the same time
    take different rows instead of waiting for each other; SQLite serialises writers (BEGIN IMMEDIATE).
    """
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
            # Only the delivery rows: the instance is the nullable side of the join (and is not changed).
            .with_for_update(skip_locked=True, of=_d)
        ).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        # A row cancelled between the SELECT and the UPDATE is not ours.
        taken = set(
            conn.execute(
                update(_d)
                .where(_d.c.id.in_(ids), _d.c.state == DeliveryState.QUEUED)
                .values(state=DeliveryState.SENDING, owner=owner, attempts=_d.c.attempts + 1, updated_at=now)
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


def record(engine: Engine, outcomes: Sequence[Outcome], owner: str) -> None:
    """Write the outcomes of a batch claimed by ``owner`` in one transaction.

    Only rows still ``sending`` and owned by ``owner`` change (and an instance delivered after an
    operator cancelled its row is recorded as delivered: it was). A row no longer ours was taken over
    by another process (this one was thought gone): its outcome is logged and dropped, never written
    over the new owner's. Deliveries and permanent failures are audited in the same transaction.
    """
    if not outcomes:
        return
    now = utcnow()
    with engine.begin() as conn:
        held = {
            r.id: r.state
            for r in conn.execute(
                select(_d.c.id, _d.c.state)
                .where(
                    _d.c.id.in_([o.id for o in outcomes]),
                    _d.c.owner == owner,
                    _d.c.state.in_([DeliveryState.SENDING, DeliveryState.CANCELLED]),
                )
                .with_for_update()
            )
        }
        ours = [
            o
            for o in outcomes
            if held.get(o.id) == DeliveryState.SENDING
            or (held.get(o.id) == DeliveryState.CANCELLED and o.state == DeliveryState.DELIVERED)
        ]
        _write_outcomes(conn, ours, owner, now)
    lost = [o for o in outcomes if o.id not in held]
    if lost:
        log.warning(
            "delivery id(s) %s: outcome (%s) not recorded: no longer this process's (taken over by another "
            "process while this one was thought gone, or cancelled and queued again by an operator)",
            ", ".join(str(o.id) for o in lost),
            ", ".join(sorted({str(o.state) for o in lost})),
        )


def _write_outcomes(conn: Connection, outcomes: Sequence[Outcome], owner: str, now: dt.datetime) -> None:
    """The UPDATEs and audit events of :func:`record` for the rows it found still ours."""
    audit.record_many(
        conn,
        [
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
        ],
    )
    mine = _d.c.owner == owner
    delivered = [o for o in outcomes if o.state == DeliveryState.DELIVERED]
    if delivered:
        conn.execute(
            update(_d)
            .where(
                _d.c.id == bindparam("b_id"),
                mine,
                # Not IN (...): an expanding parameter cannot be used with executemany.
                or_(_d.c.state == DeliveryState.SENDING, _d.c.state == DeliveryState.CANCELLED),
            )
            .values(
                state=DeliveryState.DELIVERED,
                owner=None,
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
        values: dict[str, Any] = dict(
            state=o.state, owner=None, last_status=o.status, last_error=o.error, updated_at=now
        )
        if o.state == DeliveryState.QUEUED:
            values["next_attempt_at"] = o.retry_at or now
            if not o.attempted:
                values["attempts"] = _d.c.attempts - 1
        conn.execute(update(_d).where(_d.c.id == o.id, mine, _d.c.state == DeliveryState.SENDING).values(**values))


def release(engine: Engine, ids: Sequence[int], why: str, owner: str) -> int:
    """Put rows ``owner`` claimed back (an internal error while sending them): due again a little later."""
    at = utcnow() + dt.timedelta(seconds=30)
    with engine.begin() as conn:
        return conn.execute(
            update(_d)
            .where(_d.c.id.in_(list(ids)), _d.c.owner == owner, _d.c.state == DeliveryState.SENDING)
            .values(state=DeliveryState.QUEUED, owner=None, next_attempt_at=at, updated_at=utcnow(), last_error=why)
        ).rowcount


def postpone(engine: Engine, destination: str, until: dt.datetime) -> int:
    """While a destination is in back-off, what is queued for it waits until then.

    An operator's retry (due at FORCED) is left due: it ends the back-off (:func:`end_backoff`).
    """
    with engine.begin() as conn:
        return conn.execute(
            update(_d)
            .where(
                _d.c.destination == destination,
                _d.c.state == DeliveryState.QUEUED,
                _d.c.next_attempt_at < until,
                _d.c.next_attempt_at > FORCED,
            )
            .values(next_attempt_at=until)
        ).rowcount


def take_over(
    engine: Engine, now: dt.datetime | None = None, destinations: Sequence[str] | None = None
) -> dict[str, int]:
    """Queue again the deliveries left ``sending`` by processes that are gone; returns how many per destination.

    Run at start and on every heartbeat: only rows whose owner is no live process (node.index.cluster)
    are touched, never those a live process is sending. ``last_error`` names the process and says why.
    ``destinations``: only those (the heartbeat's look then uses the claim index instead of reading
    every delivery ever made); None for all (at start).
    """
    now = now or utcnow()
    where = [_d.c.state == DeliveryState.SENDING, owner_gone(_d.c.owner, now)]
    if destinations is not None:
        if not destinations:
            return {}
        where.append(_d.c.destination.in_(list(destinations)))
    with engine.begin() as conn:
        taken = conn.execute(
            update(_d)
            .where(*where)
            .values(
                state=DeliveryState.QUEUED,
                owner=None,
                next_attempt_at=now,
                updated_at=now,
                last_error=literal("node process ")
                + func.coalesce(_d.c.owner, "(unknown)")
                + literal(" stopped while this was being sent; sending it again"),
            )
            .returning(_d.c.destination)
        ).scalars()
        out: dict[str, int] = {}
        for dest in taken:
            out[dest] = out.get(dest, 0) + 1
    return out


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
    """A destination's stored circuit, shared by every node process sending to it.

    ``updated_at`` is the row's version: every change writes a new one, and every change a process
    decides from what it read is a compare-and-set on it (another process's change since then makes
    it do nothing). While half-open, the process taking the probe writes only ``updated_at``, so
    ``updated_at > retry_at`` with failures says "a probe is under way since ``updated_at``".
    """

    failures: int = 0
    #: No attempt before this (UTC); None when the circuit is closed.
    retry_at: dt.datetime | None = None
    last_error: str = ""
    updated_at: dt.datetime | None = None

    @property
    def probe_since(self) -> dt.datetime | None:
        """When the probe under way was taken (None: none is)."""
        if self.failures and self.retry_at is not None and self.updated_at is not None:
            return self.updated_at if self.updated_at > self.retry_at else None
        return None


def _circuit(r: Any) -> Circuit:
    return Circuit(
        r.failures,
        aware(r.retry_at) if r.retry_at else None,
        r.last_error,
        aware(r.updated_at) if r.updated_at else None,
    )


def load_circuits(engine: Engine, destinations: Sequence[str]) -> dict[str, Circuit]:
    """At start-up: each destination's circuit as it is (a closed one is made where none is)."""
    now = utcnow()
    with engine.begin() as conn:
        have = {
            r.destination
            for r in conn.execute(select(_c.c.destination).where(_c.c.destination.in_(list(destinations))))
        }
        missing = [d for d in destinations if d not in have]
        if missing:
            # Two processes starting together may both find a row missing: the second one's is no change.
            conn.execute(
                insert_or_skip(_c, engine.dialect.name).values(
                    [dict(destination=d, failures=0, retry_at=None, last_error="", updated_at=now) for d in missing]
                )
            )
    return {d: read_circuit(engine, d) for d in destinations}


def read_circuit(engine: Engine, destination: str) -> Circuit:
    """A destination's circuit now (one primary-key read: a sender's worker does it at each turn)."""
    with engine.connect() as conn:
        r = conn.execute(select(_c).where(_c.c.destination == destination)).first()
    return Circuit() if r is None else _circuit(r)


def _change_circuit(
    conn: Connection, destination: str, seen: Circuit, *only: ColumnElement[bool], **values: Any
) -> bool:
    """Set ``values`` if the row is still the version ``seen`` (compare-and-set) and ``only`` holds; whether it was."""
    version = _c.c.updated_at.is_(None) if seen.updated_at is None else _c.c.updated_at == seen.updated_at
    return (
        conn.execute(update(_c).where(_c.c.destination == destination, version, *only).values(**values)).rowcount == 1
    )


def circuit_failed(
    engine: Engine, destination: str, seen: Circuit, failures: int, retry_at: dt.datetime, error: str, now: dt.datetime
) -> bool:
    """Count a transient failure, unless the circuit changed since ``seen`` (then it is the same outage).

    What is queued for the destination (an operator's retry too: it has had its try) waits for the
    back-off, in the same transaction: no sender anywhere sees the circuit open with deliveries due.
    """
    with engine.begin() as conn:
        if not _change_circuit(
            conn, destination, seen, failures=failures, retry_at=retry_at, last_error=error, updated_at=now
        ):
            return False
        conn.execute(
            update(_d)
            .where(_d.c.destination == destination, _d.c.state == DeliveryState.QUEUED, _d.c.next_attempt_at < retry_at)
            .values(next_attempt_at=retry_at)
        )
        return True


def take_probe(engine: Engine, destination: str, seen: Circuit, now: dt.datetime) -> bool:
    """Take the half-open circuit's one probe for this process: False if another process changed it first."""
    with engine.begin() as conn:
        return _change_circuit(conn, destination, seen, updated_at=now)


def end_probe(engine: Engine, destination: str, taken: dt.datetime) -> None:
    """A probe ended without a verdict (nothing to send, refused for good, stopped): the next one may go."""
    with engine.begin() as conn:
        conn.execute(
            update(_c).where(_c.c.destination == destination, _c.c.updated_at == taken).values(updated_at=_c.c.retry_at)
        )


def end_backoff(engine: Engine, destination: str, seen: Circuit, now: dt.datetime) -> bool:
    """An operator's retry: the back-off ends now for every process (the next turn anywhere probes).

    Only while what the operator made due is still waiting: once a probe has tried it and failed, it
    waits for the new back-off with everything else (:func:`circuit_failed`).
    """
    forced = (
        select(_d.c.id)
        .where(_d.c.destination == destination, _d.c.state == DeliveryState.QUEUED, _d.c.next_attempt_at <= FORCED)
        .exists()
    )
    with engine.begin() as conn:
        return _change_circuit(conn, destination, seen, forced, retry_at=now, updated_at=now)


def close_circuit(engine: Engine, destination: str) -> bool:
    """The destination took an instance: the circuit closes for all. Whether it was open."""
    with engine.begin() as conn:
        return (
            conn.execute(
                update(_c)
                .where(_c.c.destination == destination, _c.c.failures > 0)
                .values(failures=0, retry_at=None, last_error="", updated_at=utcnow())
            ).rowcount
            == 1
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
                owner=None,
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
            "owner": None,
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
    why: str = "cancelled by an operator",
) -> int:
    """Cancel queued (and in-flight) deliveries; an instance already on the wire may still arrive.

    ``why`` is added to each delivery's last error (what the dashboard and `dicom-node queue` show)."""
    return _operator_update(
        engine,
        "queue_cancel",
        delivery_in_flight(_d),
        {
            "state": DeliveryState.CANCELLED,
            "updated_at": utcnow(),
            "last_error": func.trim(func.coalesce(_d.c.last_error, "") + f" ({why})"),
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


def forward_series(
    engine: Engine, series_uid: str, destination: str, *, actor: str = "cli", priority: int = 0
) -> Enqueued:
    """Queue every stored instance of a series for ``destination`` now: an operator's "forward".

    Like a forward action, but asked for by a person: instances the destination already received are sent
    again (a person who asks for a copy wants one), those already waiting stay queued once. The caller
    checks that ``destination`` is configured. Audited (``series_forward``) as done by ``actor``;
    :class:`LookupError` for an unknown series or one without instances.
    """
    s = Series.__table__
    with engine.begin() as conn:
        sid = conn.execute(select(s.c.id).where(s.c.series_instance_uid == series_uid)).scalar()
        if sid is None:
            raise LookupError(f"no series {series_uid} in the index")
        ids = list(
            conn.execute(
                select(_i.c.id)
                .where(_i.c.series_fk == sid)
                .order_by(_i.c.instance_number.is_(None), _i.c.instance_number, _i.c.id)
            ).scalars()
        )
        if not ids:
            raise LookupError(f"series {series_uid} has no stored instances (discarded?); nothing to forward")
        got = enqueue(conn, ids, [destination], priority=priority, again=True)
        audit.record(
            conn,
            "series_forward",
            actor=actor,
            series_uid=series_uid,
            destination=destination,
            detail=f"{got.new + got.requeued} of {len(ids)} instance(s) queued"
            + (f", {got.already} already waiting" if got.already else ""),
        )
    return got
