"""The Query/Retrieve SCP's answers: C-FIND from the index, C-MOVE through the forward queue, C-GET on the association.

The acceptor (node.receive.acceptor) reads the request's identifier and calls one of the methods
here in the association's thread, with a channel for the pending responses; what a method returns is
the final response. Matching is the query engine's (node.index.query); this module decides what the
requestor is told, when, and what is recorded.

Why a C-MOVE goes through the durable queue instead of its own association: the destination then
gets the instances the way every delivery goes (its transfer syntax choices, circuit breaker,
retries, audit trail), what was asked for is not lost when the requestor gives up or the node
stops, and the dashboard shows it like any other delivery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pydicom import Dataset
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from node import audit
from node.config import Config, DestinationSection
from node.dicom.status import Category, QRStatus, category
from node.index import query
from node.index.models import utcnow
from node.index.query import Query, QueryError
from node.index.states import DeliveryState
from node.index.writer import IndexWriter
from node.receive.acceptor import AssociationInfo, QRChannel, QRFinal
from node.receive.sop_classes import QR_ROOT
from node.send import queue
from node.storage.layout import Storage

log = logging.getLogger(__name__)

#: How often a C-MOVE looks at its deliveries: soon at first (a small study is often sent within tens of
#: milliseconds), then less often, and the longest it goes without a pending response.
MOVE_POLL_FIRST = 0.02
MOVE_POLL = 0.25
MOVE_HEARTBEAT = 5.0
#: C-FIND matches held at a time (plain values, read on a short connection per page).
FIND_PAGE = 1000


@dataclass
class _Counts:
    """A retrieve's sub-operations (PS3.4 C.4.2.1.3), as the responses carry them."""

    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def as_args(self) -> dict[str, int]:
        return dict(remaining=self.remaining, completed=self.completed, failed=self.failed, warning=self.warning)

    def cancelled(self, comment: str, failed_uids: Sequence[str]) -> QRFinal:
        """The final response after a C-CANCEL: with the sub-operations that remain (PS3.4 C.4.2.1.5)."""
        return QRFinal(
            QRStatus.CANCEL,
            comment,
            remaining=self.remaining,
            completed=self.completed,
            failed=self.failed,
            warning=self.warning,
            failed_uids=tuple(failed_uids),
        )


class QueryRetrieve:
    """The node's Query/Retrieve SCP (``node.receive.acceptor.QRService``), Patient Root and Study Root.

    ``reader``: the engine queries read from; ``engine``: the one the forward queue is written with;
    ``wake_senders(destinations)``: tells the dispatcher (in a receiver process: the node process's)
    that deliveries are due; ``writer``: the index writer audit events go through (queries write
    nothing else, so they wait for no write lock).
    """

    def __init__(
        self,
        cfg: Config,
        reader: Engine,
        engine: Engine,
        storage: Storage,
        wake_senders: Callable[[list[str]], None],
        writer: IndexWriter | None = None,
    ) -> None:
        self.cfg = cfg
        self.reader = reader
        self.engine = engine
        self.storage = storage
        self.wake_senders = wake_senders
        self.writer = writer
        self._stopping = threading.Event()

    def stop(self) -> None:
        """The node is stopping: C-MOVEs waiting for deliveries answer now (the rest stays queued), C-GETs
        send nothing more, so open associations end instead of being aborted at the stop's deadline."""
        self._stopping.set()

    # -- C-FIND -----------------------------------------------------------------------------------

    def find(self, assoc: AssociationInfo, abstract: str, identifier: Dataset, channel: QRChannel) -> QRFinal:
        """Match, then answer one pending response per match; more than ``[qr] max_results`` is refused.

        The matches are read as plain values, a page (``FIND_PAGE``) at a time, each page on its own short
        connection, so no read transaction spans the network waits and memory stays bounded whatever
        ``max_results`` is (0: no limit). Each result identifier is encoded as its response is sent. Pages
        follow each other by offset: a study stored or removed meanwhile may shift a later page by one.
        """
        started = time.monotonic()
        try:
            q = query.from_identifier(identifier, QR_ROOT[abstract])
        except QueryError as e:
            return self._refused(assoc, "C-FIND", e)
        cap = self.cfg.qr.max_results
        page_size = min(cap, FIND_PAGE) if cap else FIND_PAGE
        ae = self.cfg.node.ae_title
        try:
            with self.reader.connect() as conn:
                page, more = query.find_capped(conn, q, page_size, retrieve_ae=ae)
                # More than a page: is there more than the cap? (one row past it, read by the database only)
                too_many = more and bool(cap) and (cap == page_size or _beyond(conn, q, cap))
        except SQLAlchemyError as e:
            return self._index_failed(assoc, "C-FIND", q, e)
        unsupported = query.unsupported(q)
        status = QRStatus.PENDING_WARNING if unsupported else QRStatus.PENDING
        sent = 0
        final = QRFinal(QRStatus.SUCCESS)
        if too_many:
            final = QRFinal(
                QRStatus.OUT_OF_RESOURCES_MATCHES, f"over {cap} matches: narrow the query ([qr] max_results)"
            )
        while not too_many:
            for i in range(len(page)):
                if channel.cancelled():
                    final = QRFinal(QRStatus.CANCEL, f"cancelled by the requestor after {sent} match(es)")
                    break
                channel.pending(page.elements(i), status=status)
                sent += 1
            if final.status != QRStatus.SUCCESS or not more or (cap and sent >= cap):
                break
            try:
                with self.reader.connect() as conn:
                    page, more = query.find_capped(conn, replace(q, offset=q.offset + sent), page_size, retrieve_ae=ae)
            except SQLAlchemyError as e:
                log.error("C-FIND: the index could not be read after %d match(es): %s", sent, e)
                final = QRFinal(QRStatus.UNABLE_TO_PROCESS, "the node's index could not be read; try again later")
                break
        found = f"more than {cap}" if too_many else str(sent)
        detail = f"C-FIND {q.level} ({q.root} root) on {_keys(q)}: {found} match(es), {sent} sent"
        log.info(
            "%s from %s@%s in %.0f ms%s",
            detail,
            assoc.calling_ae,
            assoc.address,
            (time.monotonic() - started) * 1000,
            f" (not supported, returned empty: {', '.join(unsupported)})" if unsupported else "",
        )
        self._audit("query", assoc, q, final.status, detail)
        return final

    # -- C-MOVE -----------------------------------------------------------------------------------

    def move(
        self, assoc: AssociationInfo, abstract: str, identifier: Dataset, destination: str, channel: QRChannel
    ) -> QRFinal:
        """Queue the matched instances for the destination and report the deliveries until they are done."""
        dest = self.destination(destination)
        if dest is None:
            # The Error Comment is an LO (64 characters): the whole story goes to the log.
            comment = f"{destination.strip()!r} is not in the node's [[destinations]]"
            log.warning(
                "C-MOVE from %s@%s refused (0xA801): move destination %r is not the ae_title of a DIMSE "
                "[[destinations]] entry of this node; add one for it to retrieve to that AE",
                assoc.calling_ae,
                assoc.address,
                destination.strip(),
            )
            self._audit("retrieve", assoc, None, QRStatus.MOVE_DESTINATION_UNKNOWN, f"C-MOVE: {comment}")
            return QRFinal(QRStatus.MOVE_DESTINATION_UNKNOWN, comment)
        try:
            q = query.from_identifier(identifier, QR_ROOT[abstract])
            query.check_retrieve(q)
        except QueryError as e:
            return self._refused(assoc, "C-MOVE", e)
        try:
            with self.reader.connect() as conn:
                refs = query.instances(conn, q)
            if refs:
                with self.engine.begin() as conn:
                    done = queue.enqueue(
                        conn,
                        [r.instance_id for r in refs],
                        [dest.name],
                        priority=self.cfg.qr.move_priority,
                        again=True,
                    )
            else:
                done = queue.Enqueued()
        except SQLAlchemyError as e:
            return self._index_failed(assoc, "C-MOVE", q, e)
        what = f"C-MOVE {q.level} ({q.root} root) on {_keys(q)} to {dest.name} ({dest.ae_title})"
        log.info(
            "%s from %s@%s: %d instance(s) (%d newly queued, %d queued again, %d already on their way)",
            what,
            assoc.calling_ae,
            assoc.address,
            len(done.ids),
            done.new,
            done.requeued,
            done.already,
        )
        if done.ids:
            self.wake_senders([dest.name])
        final = self._follow(dest, done, channel)
        log.info(
            "%s from %s@%s: final 0x%04X: %d completed, %d failed, %d warning%s",
            what,
            assoc.calling_ae,
            assoc.address,
            final.status,
            final.completed or 0,
            final.failed or 0,
            final.warning or 0,
            f" ({final.comment})" if final.comment else "",
        )
        self._audit(
            "retrieve",
            assoc,
            q,
            final.status,
            f"{what}: {final.completed or 0} completed, {final.failed or 0} failed, {final.warning or 0} warning",
            destination=dest.name,
        )
        return final

    def destination(self, ae_title: str) -> DestinationSection | None:
        """The first DIMSE ``[[destinations]]`` entry with this AE title (a C-MOVE names an AE, the queue a name)."""
        wanted = ae_title.strip()
        return next((d for d in self.cfg.destinations if d.type == "dimse" and d.ae_title == wanted), None)

    def _follow(self, dest: DestinationSection, done: queue.Enqueued, channel: QRChannel) -> QRFinal:
        """Pending responses while the deliveries ``done`` go out; the final once all ended, on cancel or timeout."""
        ids = list(done.ids)
        counts = _Counts(len(ids))
        failed: list[str] = []
        # From enqueue time: a row removed meanwhile is still named in the Failed SOP Instance UID List.
        uid_of = dict(zip(done.ids, done.sop_instance_uids, strict=True))
        open_ids = ids
        started = time.monotonic()
        deadline = started + self.cfg.qr.move_timeout
        last_sent: tuple[int, ...] = ()
        last_at = time.monotonic()
        poll = MOVE_POLL_FIRST
        while open_ids:
            with self.reader.connect() as conn:
                states = queue.states_of(conn, open_ids)
            seen = {s.id for s in states}
            still: list[int] = []
            for s in states:
                if s.state == DeliveryState.DELIVERED:
                    if s.warning:
                        counts.warning += 1
                    else:
                        counts.completed += 1
                elif s.state in (DeliveryState.FAILED, DeliveryState.CANCELLED):
                    counts.failed += 1
                    failed.append(s.sop_instance_uid)
                else:
                    still.append(s.id)
            gone = [i for i in open_ids if i not in seen]  # removed meanwhile (retention, a discard): not delivered
            counts.failed += len(gone)
            failed += [uid_of[i] for i in gone]
            open_ids = still
            if not open_ids:
                break
            if channel.cancelled():
                mine = set(done.queued)
                stopped = queue.cancel(
                    self.engine,
                    ids=[i for i in open_ids if i in mine],
                    actor="C-MOVE requestor (C-CANCEL)",
                    why="the C-MOVE that queued it was cancelled by its requestor",
                )
                log.info(
                    "C-MOVE to %s cancelled by the requestor: %d queued delivery(ies) cancelled", dest.name, stopped
                )
                return counts.cancelled(f"cancelled: {stopped} queued for {dest.name} cancelled", failed)
            now = time.monotonic()
            down = self._unreachable(dest.name)
            if now >= deadline or self._stopping.is_set() or down:
                left = len(open_ids)
                failed += [uid_of[i] for i in open_ids]
                counts.failed += left
                if self._stopping.is_set():
                    why = "the node is stopping"
                elif down:
                    why = f"{dest.name} is unreachable, its next try is in {down}"
                else:
                    why = "[qr] move_timeout"
                log.warning(
                    "C-MOVE to %s: %d instance(s) still queued after %.0f s (%s): reported failed to the requestor; "
                    "they stay in the queue and are delivered when %s takes them",
                    dest.name,
                    left,
                    now - started,
                    why,
                    dest.name,
                )
                return QRFinal(
                    QRStatus.SUBOPS_WARNING if counts.completed or counts.warning else QRStatus.OUT_OF_RESOURCES_SUBOPS,
                    f"{left} still queued for {dest.name}: {'unreachable, ' if down and not self._stopping.is_set() else ''}"
                    "delivered later",
                    failed_uids=tuple(failed),
                    completed=counts.completed,
                    failed=counts.failed,
                    warning=counts.warning,
                )
            key = (counts.completed, counts.failed, counts.warning)
            if key != last_sent or now - last_at >= MOVE_HEARTBEAT:
                channel.pending(None, **counts.as_args())
                last_sent, last_at = key, now
            self._stopping.wait(poll)
            poll = min(poll * 2, MOVE_POLL)
        return _retrieve_final(counts, failed, f"to {dest.name}")

    def _unreachable(self, destination: str) -> str:
        """When the destination's circuit is open (its last tries failed; the queue waits out a back-off before
        the next): how long until that next try and why the last failed, else "". A C-MOVE does not wait for
        it: the requestor hears at once that the rest is queued."""
        try:
            c = queue.read_circuit(self.reader, destination)
        except SQLAlchemyError:
            return ""
        now = utcnow()
        if not c.failures or c.retry_at is None or c.retry_at <= now:
            return ""
        return f"{(c.retry_at - now).total_seconds():.0f} s ({c.last_error or 'failed'})"

    # -- C-GET ------------------------------------------------------------------------------------

    def get(self, assoc: AssociationInfo, abstract: str, identifier: Dataset, channel: QRChannel) -> QRFinal:
        """Send the matched instances back on this association (C-STORE sub-operations), as stored."""
        started = time.monotonic()
        try:
            q = query.from_identifier(identifier, QR_ROOT[abstract])
            query.check_retrieve(q)
        except QueryError as e:
            return self._refused(assoc, "C-GET", e)
        try:
            with self.reader.connect() as conn:
                refs = query.instances(conn, q)
        except SQLAlchemyError as e:
            return self._index_failed(assoc, "C-GET", q, e)
        counts = _Counts(len(refs))
        failed: list[str] = []
        reasons: dict[str, int] = {}
        final: QRFinal | None = None
        for n, ref in enumerate(refs):
            if channel.cancelled():
                final = counts.cancelled("cancelled by the requestor", failed)
                break
            if self._stopping.is_set():
                failed += [r.sop_instance_uid for r in refs[n:]]
                counts.failed += len(refs) - n
                final = _retrieve_final(counts, failed, "(the node is stopping)")
                break
            status, comment = self._store(channel, ref)
            kind = category(status)
            if kind == Category.SUCCESS:
                counts.completed += 1
            elif kind == Category.WARNING:
                counts.warning += 1
            else:
                counts.failed += 1
                failed.append(ref.sop_instance_uid)
                why = f"0x{status:04X} {comment}".strip()
                reasons[why] = reasons.get(why, 0) + 1
            if n + 1 < len(refs):
                channel.pending(None, **counts.as_args())
        if final is None:
            final = _retrieve_final(counts, failed, "to the requestor")
            if reasons and all("no presentation context" in why for why in reasons):
                # The usual cause, worth the Error Comment: the requestor takes none of the stored syntaxes.
                final.comment = f"{counts.failed} not sent: stored syntax not accepted (no transcoding)"
        for why, k in reasons.items():
            log.warning("C-GET from %s@%s: %d instance(s) not sent: %s", assoc.calling_ae, assoc.address, k, why)
        what = f"C-GET {q.level} ({q.root} root) on {_keys(q)}"
        log.info(
            "%s from %s@%s: final 0x%04X: %d completed, %d failed, %d warning in %.1f s",
            what,
            assoc.calling_ae,
            assoc.address,
            final.status,
            counts.completed,
            counts.failed,
            counts.warning,
            time.monotonic() - started,
        )
        self._audit(
            "retrieve",
            assoc,
            q,
            final.status,
            f"{what}: {counts.completed} completed, {counts.failed} failed, {counts.warning} warning",
        )
        return final

    def _store(self, channel: QRChannel, ref: query.InstanceRef) -> tuple[int, str]:
        """One C-STORE sub-operation; a stored file that is gone fails this instance only."""
        try:
            path = self.storage.absolute(ref.file_path)
        except ValueError as e:
            return QRStatus.UNABLE_TO_PROCESS, str(e)
        if not path.is_file():
            return (
                QRStatus.UNABLE_TO_PROCESS,
                f"the stored file {ref.file_path} is missing (removed by retention meanwhile?)",
            )
        return channel.store(path, ref.sop_class_uid, ref.sop_instance_uid, ref.transfer_syntax_uid)

    # -- shared -----------------------------------------------------------------------------------

    def _refused(self, assoc: AssociationInfo, op: str, e: QueryError) -> QRFinal:
        """A query the node cannot run: 0xA900 with the offending element and what to change."""
        log.warning("%s from %s@%s refused: %s", op, assoc.calling_ae, assoc.address, e)
        self._audit(
            "query" if op == "C-FIND" else "retrieve", assoc, None, QRStatus.IDENTIFIER_DOES_NOT_MATCH, f"{op}: {e}"
        )
        return QRFinal(QRStatus.IDENTIFIER_DOES_NOT_MATCH, str(e), offending=(e.tag,) if e.tag is not None else ())

    def _index_failed(self, assoc: AssociationInfo, op: str, q: Query, e: SQLAlchemyError) -> QRFinal:
        log.error("%s from %s@%s: the index could not be read: %s", op, assoc.calling_ae, assoc.address, e)
        return QRFinal(QRStatus.UNABLE_TO_PROCESS, "the node's index could not be read; try again later")

    def _audit(
        self,
        kind: str,
        assoc: AssociationInfo,
        q: Query | None,
        status: int,
        detail: str,
        *,
        destination: str = "",
    ) -> None:
        """One audit event per request (UIDs and key names only: the values may be patient data)."""
        if self.writer is None:
            return
        keys = q.keys if q is not None else {}
        audit.submit(
            self.writer,
            kind,
            actor=assoc.calling_ae,
            calling_ae=assoc.calling_ae,
            called_ae=assoc.called_ae,
            peer_address=assoc.address,
            study_uid=_single_uid(keys.get("StudyInstanceUID", "")),
            series_uid=_single_uid(keys.get("SeriesInstanceUID", "")),
            destination=destination,
            status=status,
            detail=detail,
        )


def _retrieve_final(counts: _Counts, failed: Sequence[str], where: str) -> QRFinal:
    """A C-MOVE/C-GET's final status from its counts (PS3.4 C.4.2.1.5, C.4.3.1.4)."""
    if counts.failed == 0 and counts.warning == 0:
        status, comment = QRStatus.SUCCESS, ""
    elif counts.completed == 0 and counts.warning == 0:
        status, comment = QRStatus.OUT_OF_RESOURCES_SUBOPS, f"none of {counts.failed} instance(s) could be sent {where}"
    else:
        status = QRStatus.SUBOPS_WARNING
        comment = f"{counts.failed} of {counts.total} instance(s) could not be sent {where}" if counts.failed else ""
    return QRFinal(
        status,
        comment,
        completed=counts.completed,
        failed=counts.failed,
        warning=counts.warning,
        failed_uids=tuple(failed),
    )


def _beyond(conn: Connection, q: Query, cap: int) -> bool:
    """Whether ``q`` matches more than ``cap`` (the database skips the first ``cap``; one row is read)."""
    past, _more = query.find_capped(conn, replace(q, offset=q.offset + cap, limit=1), 0)
    return len(past) > 0


def _keys(q: Query) -> str:
    """The keys a query matches on (non-empty values), by name only: their values may be patient data."""
    return ", ".join(k for k, v in q.keys.items() if v) or "(all)"


def _single_uid(value: str) -> str:
    """A UID key naming one entity (for the audit row); a list or wildcard names none."""
    return value if value and "\\" not in value and "*" not in value and "?" not in value else ""
