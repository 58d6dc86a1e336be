"""The audit trail: who connected, what was stored, decided, made, sent, and what operators changed.

Why a table and not the log: logs rotate, can be switched to DEBUG noise or shipped nowhere, and
may not hold patient data; an audit trail has to be complete, queryable by UID and kept. Each row
is written in the same transaction as the change it records (the instance's index row, the job
rows, the delivery's outcome, the operator's update), so the trail is never out of step with the
index: a rolled-back change leaves no audit row, a committed one always has its row. The table is
append-only by the database's own triggers (migration 0005).

What is written: UIDs, AE titles, addresses, rule names, job numbers, destinations, DIMSE statuses
and short texts; never patient names, IDs or birth dates.

Three ways in, one per kind of caller:

- :func:`record` on a SQLAlchemy connection inside the caller's transaction;
- :func:`record_tx` on the index writer's raw transaction (the receive path, outputs);
- :func:`submit` hands a row to the index writer without waiting (association events).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, func, or_, select

from node.index.models import AuditEvent, aware, utcnow

if TYPE_CHECKING:
    from node.index.writer import IndexWriter, Tx

log = logging.getLogger(__name__)

#: Every kind of event, with what it means.
KINDS: dict[str, str] = {
    "association_accepted": "a peer's association was accepted (calling/called AE, address)",
    "association_rejected": "a peer's association was rejected, and why",
    "instance_stored": "a received instance was stored and indexed (new, or replacing a copy)",
    "instance_duplicate": "a received instance was already stored; the first copy was kept",
    "rule_fired": "a rule matched a stable series revision",
    "job_created": "a job was made for a (series revision, rule, action)",
    "output_produced": "a job's plugin made a derived instance (SEG, SC, ...), which was stored",
    "delivered": "a destination accepted an instance (C-STORE success or warning)",
    "delivery_failed": "a delivery failed for good (not retried)",
    "queue_retry": "an operator queued failed or cancelled deliveries again",
    "queue_retry_now": "an operator made waiting deliveries due at once",
    "queue_cancel": "an operator cancelled deliveries",
    "job_retry": "an operator ran a failed or cancelled job again",
    "job_cancel": "an operator cancelled a job",
    "job_rerun": "an operator ran a finished job again, as a new job (the next run of its rule and action)",
    "rules_rerun": "an operator had the current rules evaluated again on a series' latest revision",
    "series_forward": "an operator queued a series' instances for a destination",
    "query": "a C-FIND or QIDO-RS search: the level and the keys matched on (names only), how many matched, the status",
    "retrieve": "a C-MOVE, C-GET or WADO-RS retrieval: what was asked for, the destination, the counts, the status",
    "prior_retrieved": "the node retrieved a prior study from a [[sources]] PACS for a job (C-MOVE or C-GET): the "
    "source, how, how many instances",
    "series_deleted": "a series' instances and files were deleted: by retention (or an operator's run), or a rule's discard",
}

#: The columns a caller may set (``at`` and ``kind`` are set by the functions here).
FIELDS = (
    "actor",
    "calling_ae",
    "called_ae",
    "peer_address",
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "rule",
    "job_id",
    "destination",
    "status",
    "detail",
)
_LIMITS = {
    "actor": 64,
    "calling_ae": 16,
    "called_ae": 16,
    "peer_address": 64,
    "study_uid": 128,
    "series_uid": 128,
    "sop_instance_uid": 128,
    "rule": 128,
    "destination": 64,
}
_NULLABLE = ("job_id", "status")

_table = AuditEvent.__table__
_INSERT = _table.insert()
_KEYS = ["at", "kind", *FIELDS]


def row(kind: str, at: dt.datetime | None = None, **fields: Any) -> dict[str, Any]:
    """A complete audit row: unknown kinds and fields are programming errors, long values are cut."""
    if kind not in KINDS:
        raise ValueError(f"unknown audit event kind {kind!r}")
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown audit field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {"at": at or utcnow(), "kind": kind}
    for name in FIELDS:
        value = fields.get(name)
        if name in _NULLABLE:
            out[name] = None if value is None else int(value)
        else:
            text = "" if value is None else str(value)
            limit = _LIMITS.get(name)
            out[name] = text[:limit] if limit else text
    return out


def record(conn: Connection, kind: str, **fields: Any) -> None:
    """Write one event in the caller's transaction (it commits or rolls back with the change it records)."""
    conn.execute(_INSERT, row(kind, **fields))


def record_many(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows made by :func:`row` in the caller's transaction, in one statement."""
    if rows:
        conn.execute(_INSERT, list(rows))


def record_tx(tx: Tx, kind: str, **fields: Any) -> None:
    """Write one event in the index writer's open transaction (a prepared statement: cheap per instance)."""
    write_tx(tx, row(kind, **fields))


def write_tx(tx: Tx, values: dict[str, Any]) -> None:
    """Write a row made by :func:`row` in the index writer's open transaction.

    For the receive path: the row is made in the association's thread, so the writer thread (which
    every association waits for) only runs the INSERT.
    """
    tx.execute(tx.prepare("audit_insert", _INSERT, _KEYS), values)


def submit(writer: IndexWriter, kind: str, **fields: Any) -> None:
    """Hand one event to the index writer's next transaction without waiting for it (never raises)."""
    try:
        values = row(kind, **fields)
        fut = writer.submit(lambda tx: write_tx(tx, values))
    except Exception:
        log.exception("could not write the audit event %s", kind)
        return

    def done(f: Any) -> None:
        exc = f.exception() if not f.cancelled() else None
        if exc is not None:
            log.error("could not write the audit event %s: %s", kind, exc)

    fut.add_done_callback(done)


# --- reading ---------------------------------------------------------------------


def _conditions(
    since: dt.datetime | None, until: dt.datetime | None, kind: str | Iterable[str] | None, uid: str | None
) -> list[Any]:
    c = _table.c
    cond: list[Any] = []
    if since is not None:
        cond.append(c.at >= _utc(since))
    if until is not None:
        cond.append(c.at < _utc(until))
    if kind:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown audit event kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
        cond.append(c.kind.in_(kinds))
    if uid:
        cond.append(or_(c.sop_instance_uid == uid, c.series_uid == uid, c.study_uid == uid))
    return cond


def _utc(value: dt.datetime) -> dt.datetime:
    return aware(value).astimezone(dt.UTC)


def query(
    engine: Engine,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    kind: str | Iterable[str] | None = None,
    uid: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Events, newest first.

    ``since`` (inclusive) and ``until`` (exclusive) are datetimes (naive ones are taken as UTC);
    ``kind`` one kind or several (see :data:`KINDS`); ``uid`` matches a study, series or SOP Instance
    UID. Each event is a dict of the table's columns: ``id``, ``at`` (an aware UTC datetime),
    ``kind``, the fields of :data:`FIELDS` (``job_id`` and ``status`` may be ``None``).
    """
    q = select(_table).where(*_conditions(since, until, kind, uid)).order_by(_table.c.id.desc())
    q = q.limit(max(0, int(limit))).offset(max(0, int(offset)))
    with engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    return [dict(r, at=aware(r["at"])) for r in rows]


def count(
    engine: Engine,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    kind: str | Iterable[str] | None = None,
    uid: str | None = None,
) -> int:
    """How many events :func:`query` would page through with the same filters."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(_table).where(*_conditions(since, until, kind, uid))
            ).scalar_one()
        )


def format_event(event: dict[str, Any]) -> str:
    """One event as one line for a terminal or a text export: time, kind, then the fields that are set."""
    at = event["at"]
    when = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" if isinstance(at, dt.datetime) else at
    parts = [str(when), f"{event['kind']:<20}"]
    names = {
        "calling_ae": "calling",
        "called_ae": "called",
        "peer_address": "peer",
        "sop_instance_uid": "sop",
        "series_uid": "series",
        "study_uid": "study",
        "job_id": "job",
    }
    for name in FIELDS:
        value = event.get(name)
        if value is None or value == "" or name == "detail":
            continue
        if name == "status":
            value = f"0x{int(value):04X}"
        parts.append(f"{names.get(name, name)}={value}")
    if event.get("detail"):
        parts.append(f"- {event['detail']}")
    return " ".join(parts)
