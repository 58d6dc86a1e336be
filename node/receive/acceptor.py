"""The acceptor: one thread per association, no hand-offs.

Why not pynetdicom's acceptor: it moves each message through a DUL thread, a
state machine, queues and an association thread, and builds pydicom
Datasets for every command set. Measured here with a handler that did
nothing, that capped a single stream at ~260 small instances/s, far below
what the disk allows. A storage SCP needs a small part of PS3.8: accept or
reject an association, read P-DATA, answer C-ECHO and C-STORE, release or
abort. This module does that part directly on the socket, in the
association's own thread, streaming data set fragments to disk as they are
read. PDUs, negotiation and command sets are :mod:`node.dicom`'s; this module
is the acceptor's state machine, its limits and its hand-over to the handlers.

What a malformed or out-of-place PDU gets (PS3.8 9.3.8, 9.1.5):

- anything but an A-ASSOCIATE-RQ first, or one over 1 MiB: A-ABORT (provider, unexpected PDU);
- an A-ASSOCIATE-RQ that does not decode: A-ABORT (provider, reason not specified);
- protocol version other than 1: A-ASSOCIATE-RJ (permanent, ACSE, protocol version not supported);
- an application context other than DICOM's: A-ASSOCIATE-RJ (permanent, user, context not supported);
- a P-DATA-TF that breaks PS3.8 (PDV lengths, unaccepted context, command/data set order):
  A-ABORT (provider, invalid PDU parameter value);
- a known PDU type out of place: A-ABORT (provider, unexpected PDU); an unknown type: unrecognised PDU;
- ARTIM: no complete A-ASSOCIATE-RQ within node.acse_timeout: the connection is closed.

Query/Retrieve (with a :class:`QRService`): a C-FIND, C-MOVE or C-GET request's identifier is read
into memory (at most 1 MiB: more aborts the association), then the service runs in the
association's own thread and answers through a :class:`QRChannel` (pending responses, C-CANCEL
checks, C-GET's C-STORE sub-operations on this association); the acceptor writes the final response.
While it runs, only a C-CANCEL-RQ (and, for C-GET, C-STORE-RSPs) may arrive: another request is a
protocol error (asynchronous operations are not negotiated), an A-ABORT ends the association.
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.dsutils import encode as encode_dataset

from node import metrics
from node.dicom import association, dimse, pdu
from node.dicom.dimse import VERIFICATION
from node.dicom.pdu import (
    MAX_CONTROL_PDU,
    PDV_HEAD,
    AbortReason,
    AbortSource,
    ContextResult,
    PduReader,
    PduType,
    Pdv,
    PeerClosed,
    Rejection,
)
from node.dicom.status import QRStatus, Status
from node.receive import sop_classes
from node.receive.rxfile import ReceivedFile

log = logging.getLogger(__name__)


#: Data set fragments are copied to disk in pieces of at most this size (the reader's buffer).
CHUNK = pdu.CHUNK
_KNOWN_PDU_TYPES = frozenset(PduType)
#: Plain ints: an IntFlag operand would make each PDV's ``&`` a Python-level call.
_COMMAND, _LAST = int(Pdv.COMMAND), int(Pdv.LAST)
#: Receive buffer until the association is accepted: an A-ASSOCIATE-RQ is a few KiB, and a
#: connection that never associates must not cost a CHUNK of memory.
NEGOTIATION_BUFFER = 16 << 10
#: Command sets are small; anything bigger is a protocol error, not a command.
MAX_COMMAND = 1 << 16
MAX_EVENT_DATASET = 16 << 20
#: A C-FIND/C-MOVE/C-GET identifier is a few keys; a larger one aborts the association.
MAX_IDENTIFIER = 1 << 20
#: How often a Q/R channel looks at the socket for a C-CANCEL-RQ: every CANCEL_POLL_CALLS calls of
#: cancelled() or CANCEL_POLL seconds, whichever comes first (data already read is looked at every call).
CANCEL_POLL = 0.05
CANCEL_POLL_CALLS = 8
#: Data per P-DATA-TF we send when the peer takes PDUs of any size (its Maximum Length is 0).
UNLIMITED_FRAGMENT = 1 << 20
#: Q/R request -> (its response, the SOP classes it is for, its name for logs and comments).
_QR_COMMANDS: dict[int, tuple[int, frozenset[str], str]] = {
    dimse.C_FIND_RQ: (dimse.C_FIND_RSP, sop_classes.QR_FIND, "C-FIND"),
    dimse.C_MOVE_RQ: (dimse.C_MOVE_RSP, sop_classes.QR_MOVE, "C-MOVE"),
    dimse.C_GET_RQ: (dimse.C_GET_RSP, sop_classes.QR_GET, "C-GET"),
}


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted."""


class _PeerAborted(PeerClosed):
    """The peer sent an A-ABORT while a Q/R operation was answering."""


@dataclass(slots=True)
class AssociationInfo:
    """What an association is, for handlers, logs and the index."""

    id: str
    calling_ae: str
    called_ae: str
    address: str
    port: int
    max_pdu: int = 0
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (abstract, transfer)
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0


@dataclass(slots=True)
class StoreRequest:
    command: dimse.Command
    transfer_syntax: str
    abstract_syntax: str
    file: ReceivedFile


class Handlers(Protocol):
    """What the acceptor asks of the application (the node's SCP)."""

    def check_association(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None:
        """Return ``None`` to accept or the rejection to answer with (PS3.8 9.3.4)."""

    def store(self, assoc: AssociationInfo, request: StoreRequest) -> tuple[int, str]:
        """Store one data set; return ``(status, error comment)``. Must not raise."""

    def association_accepted(self, assoc: AssociationInfo) -> None:
        """Called once the A-ASSOCIATE-AC is sent. Must not raise."""

    def association_rejected(self, assoc: AssociationInfo, reason: str, text: str) -> None:
        """The acceptor rejected a request on its own (``reason``: "protocol", "limit"); ``text`` says why.

        Rejections decided by :meth:`check_association` are the handler's to record. Must not raise.
        """

    def association_ended(self, assoc: AssociationInfo, how: str) -> None:
        """Called once per accepted association: ``released``, ``aborted``, ``closed`` or ``timeout``."""

    def event_report(self, assoc: AssociationInfo, command: dimse.Command, transfer_syntax: str, data: bytes) -> int:
        """An N-EVENT-REPORT (Storage Commitment's result); return its status. Must not raise."""


@dataclass
class QRFinal:
    """A Q/R operation's final response (the acceptor writes it when the service returns)."""

    status: int
    comment: str = ""
    #: Offending Element (0000,0901): tags as ``0xGGGGEEEE`` (with 0xA900 / 0xC000).
    offending: tuple[int, ...] = ()
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    #: C-MOVE/C-GET: the Failed SOP Instance UID List (0008,0058) identifier sent with a failure/warning final.
    failed_uids: tuple[str, ...] = ()


class QRChannel(Protocol):
    """What a Q/R service answers through, in the association's thread."""

    abstract_syntax: str

    def pending(
        self,
        identifier: Dataset | Sequence[dimse.Element] | None = None,
        *,
        remaining: int | None = None,
        completed: int | None = None,
        failed: int | None = None,
        warning: int | None = None,
        status: int = QRStatus.PENDING,
    ) -> None:
        """A pending response: a C-FIND match (``status`` 0xFF01 if optional keys are not supported) or
        C-MOVE/C-GET progress counts. A match given as elements (tag, VR, value; Specific Character Set
        ISO_IR 192) is written by ``dimse.encode_identifier``, without a pydicom Dataset."""

    def cancelled(self) -> bool:
        """Whether a C-CANCEL-RQ for this request has arrived (does not wait; looks at the socket at most
        every ``CANCEL_POLL`` seconds)."""

    def store(
        self,
        path: Path,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        move_originator: tuple[str, int] | None = None,
    ) -> tuple[int, str]:
        """C-GET: one C-STORE sub-operation on this association; ``(status, comment)``. A peer's refusal
        and a file that cannot be sent are statuses, not exceptions."""


class QRService(Protocol):
    """The Query/Retrieve SCP's logic (``node.qr``); returns the final response. Exceptions other than
    the channel's are logged and answered with 0xC000."""

    def find(self, assoc: AssociationInfo, abstract: str, identifier: Dataset, channel: QRChannel) -> QRFinal: ...

    def move(
        self, assoc: AssociationInfo, abstract: str, identifier: Dataset, destination: str, channel: QRChannel
    ) -> QRFinal: ...

    def get(self, assoc: AssociationInfo, abstract: str, identifier: Dataset, channel: QRChannel) -> QRFinal: ...


@dataclass
class AcceptorSettings:
    ae_title: str
    max_pdu: int
    max_associations: int
    acse_timeout: float
    network_timeout: float
    implementation_class_uid: str
    implementation_version: str
    #: abstract syntax -> accepted transfer syntaxes
    supported: dict[str, frozenset[str]]
    #: Temp directory on the storage filesystem (so the final rename is atomic).
    receive_dir: Path
    #: SOP classes for which a requestor may take the SCP role (sends us N-EVENT-REPORTs).
    scp_role_classes: frozenset[str] = frozenset()
    #: Transfer syntaxes for an abstract syntax not in ``supported`` that the standard does not give
    #: to another service (a private or newer storage class); empty: such contexts are refused.
    unknown_storage: frozenset[str] = frozenset()
    #: Connections not yet associated (TLS handshake, waiting for the A-ASSOCIATE-RQ), in all and
    #: per peer address; more are closed at once.
    max_pending: int = 64
    max_pending_per_address: int = 16
    ssl_context: ssl.SSLContext | None = None
    #: Share the port with the node's other processes on this host (``[node] processes``): SO_REUSEPORT,
    #: the kernel spreads new connections over them. Off for a single process, so that a second node
    #: started on the same port by mistake fails with "address in use" rather than taking half the traffic.
    reuse_port: bool = False


class _Throttled:
    """One log line per ``interval`` seconds at most for an event that may come in floods (the next
    line says how many were left out): a flood of connections must not become a flood of logs."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._skipped += 1
                return
            skipped, self._skipped, self._next = self._skipped, 0, now + self.interval
        if skipped:
            msg += f" ({skipped} more like this in the last {self.interval:.0f} s, not logged)"
        log.warning(msg, *args)


def _send_quietly(reader: PduReader, data: bytes) -> None:
    """Association-control PDUs (accept, reject, abort): a peer that is gone is not an error here."""
    try:
        reader.sock.sendall(data)
    except OSError:
        pass


class Association(threading.Thread):
    def __init__(self, server: Acceptor, sock: socket.socket, address: tuple[str, int]) -> None:
        super().__init__(name=f"assoc-{address[0]}:{address[1]}", daemon=True)
        self.server = server
        self.settings = server.settings
        self.handlers = server.handlers
        self.raw_sock = sock
        self.sock: socket.socket = sock  # the TLS-wrapped socket once the handshake is done
        self.address = address
        self.info: AssociationInfo | None = None
        self._rx: ReceivedFile | None = None
        self._tmp: Path | None = None
        self._spare: ReceivedFile | None = None
        #: An N-EVENT-REPORT's data set or a Q/R identifier while it arrives, and its size limit.
        self._small: bytearray | None = None
        self._small_limit = MAX_EVENT_DATASET
        #: A Q/R request whose identifier is complete: run once the PDU that ended it is read.
        self._qr_request: tuple[dimse.Command, int, bytes | None] | None = None
        #: A C-CANCEL-RQ for it came in the same PDU.
        self._qr_cancel = False
        #: Storage SOP classes for which the requestor took the SCP role (C-GET sub-operations).
        self._requestor_scp: frozenset[str] = frozenset()
        #: Message IDs of the C-STORE sub-operations we send.
        self._sub_message_id = 0
        self._closing = False
        #: Why the acceptor closed this connection before its association request ("acse-timeout": it
        #: took longer than node.acse_timeout; "pending-limit": room was needed for a newer one).
        self.cut_off: str | None = None

    # --- lifecycle ----------------------------------------------------------

    def run(self) -> None:
        sock = self.raw_sock
        how = "closed"
        try:
            if self.settings.ssl_context is not None:
                sock.settimeout(self.settings.acse_timeout)
                try:
                    sock = self.settings.ssl_context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    if self.cut_off:
                        self.server.log_cut_off(self, "TLS handshake")
                    else:
                        log.warning("TLS handshake with %s:%d failed: %s", *self.address, e)
                    return
                self.sock = sock
            conn = PduReader(sock, NEGOTIATION_BUFFER)
            if not self._negotiate(conn):
                return
            conn.grow(CHUNK)
            how = self._serve(conn)
        except Exception:  # never let a bug escape a thread silently
            log.exception("association from %s:%d failed", *self.address)
            how = "aborted"
            try:
                sock.sendall(pdu.a_abort())
            except OSError:
                pass
        finally:
            self._discard_partial()
            if self._tmp is not None:
                try:
                    self._tmp.rmdir()
                except OSError:
                    pass
            try:
                sock.close()
            except OSError:
                pass
            self.server._finished(self)
            if self.info is not None:
                try:
                    self.handlers.association_ended(self.info, how)
                except Exception:
                    log.exception("association_ended handler failed")

    def abort(self) -> None:
        """Abort from another thread (node shutdown)."""
        self._closing = True
        if self.settings.ssl_context is None:  # an SSL socket must not be written from two threads
            try:
                self.raw_sock.sendall(pdu.a_abort())
            except OSError:
                pass
        try:
            self.raw_sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _receive_dir(self) -> Path:
        """A temp directory of this association's own: concurrent associations creating
        and renaming files in one shared directory contend for its lock."""
        if self._tmp is None:
            assert self.info is not None  # files are made only once the association is accepted
            self._tmp = self.settings.receive_dir / f"a-{self.info.id}"
            self._tmp.mkdir(parents=True, exist_ok=True)  # also after crash recovery took it for gone
        return self._tmp

    def _new_file(self) -> ReceivedFile:
        """A temp file for the next data set; one that cannot be created (storage full) still takes the
        data set, discarding it, so that the request is answered (0xA700) and the association goes on."""
        try:
            return ReceivedFile(self._receive_dir())
        except OSError as e:
            return ReceivedFile.unwritable(e)

    def _discard_partial(self) -> None:
        for rx in (self._rx, self._spare):
            if rx is not None:
                rx.discard()
        self._rx = self._spare = None

    # --- association establishment ----------------------------------------

    def _negotiate(self, conn: PduReader) -> bool:
        # ARTIM (PS3.8 9.1.5) for each read; the acceptor closes the connection when node.acse_timeout
        # has passed since it connected, however slowly the request trickles in.
        conn.sock.settimeout(self.settings.acse_timeout)
        try:
            pdu_type, length = conn.read_header()
            if pdu_type != PduType.A_ASSOCIATE_RQ or length > MAX_CONTROL_PDU:
                what = (
                    f"PDU type 0x{pdu_type:02X}"
                    if pdu_type != PduType.A_ASSOCIATE_RQ
                    else f"a PDU of {length} bytes (> 1 MiB)"
                )
                log.warning("%s:%d sent %s instead of an A-ASSOCIATE-RQ; aborting", *self.address, what)
                _send_quietly(conn, pdu.a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.UNEXPECTED_PDU))
                return False
            body = conn.read_exact(length)
        except PeerClosed:
            if self.cut_off:
                self.server.log_cut_off(self, "A-ASSOCIATE-RQ")
            return False  # port scanners, health checks that only connect
        self.server.requested(self)
        try:
            rq = pdu.AssociateRQ.decode(body)
        except pdu.PduError as e:
            log.warning("%s:%d sent an undecodable A-ASSOCIATE-RQ (%s); aborting", *self.address, e)
            _send_quietly(conn, pdu.a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.NOT_SPECIFIED))
            return False
        calling, called = rq.calling_ae, rq.called_ae
        info = AssociationInfo(
            id=uuid.uuid4().hex[:12],
            calling_ae=calling,
            called_ae=called,
            address=self.address[0],
            port=self.address[1],
            max_pdu=rq.user.max_pdu or 0,
        )

        reject: Rejection | None = None
        why = ("", "")
        invalid = association.check_request(rq)
        if invalid is not None:
            reject, why = invalid[0], ("protocol", invalid[1])
        else:
            reject = self.handlers.check_association(calling, called, self.address[0])
            if reject is None and not self.server._admit(self):
                log.warning(
                    "rejected association from %s (%s): node.max_associations (%d) reached",
                    calling,
                    self.address[0],
                    self.settings.max_associations,
                    extra={"calling_ae": calling, "peer_address": self.address[0]},
                )
                reject = pdu.LOCAL_LIMIT_EXCEEDED
                why = ("limit", f"node.max_associations ({self.settings.max_associations}) reached")
        if reject is not None and why[0]:
            if why[0] == "protocol":
                log.warning(
                    "rejected association from %s (%s): %s",
                    calling,
                    self.address[0],
                    why[1],
                    extra={"calling_ae": calling, "peer_address": self.address[0]},
                )
            try:
                self.handlers.association_rejected(info, *why)
            except Exception:
                log.exception("association_rejected handler failed")
        if reject is not None:
            _send_quietly(conn, pdu.a_associate_rj(reject))
            return False

        answers = []
        storage: set[str] = set()
        for cx in rq.contexts:
            accepted, why_not = self._syntaxes_for(cx.abstract_syntax)
            answer = association.answer_context(cx, accepted)
            answers.append(answer)
            if answer.result == ContextResult.ACCEPTANCE:
                info.contexts[cx.id] = (cx.abstract_syntax, answer.transfer_syntax)
                if accepted is self.settings.unknown_storage or sop_classes.is_standard_storage(cx.abstract_syntax):
                    storage.add(cx.abstract_syntax)
                if accepted is self.settings.unknown_storage and cx.abstract_syntax not in self.settings.supported:
                    log.info(
                        "association %s from %s: accepted presentation context %d for %s as a storage "
                        "class (node.accept_unknown_sop_classes)",
                        info.id,
                        calling,
                        cx.id,
                        sop_classes.describe(cx.abstract_syntax),
                    )
            else:
                log.info(
                    "association %s from %s: refused presentation context %s, transfer syntaxes %s: %s",
                    info.id,
                    calling,
                    sop_classes.describe(cx.abstract_syntax),
                    ", ".join(cx.transfer_syntaxes),
                    why_not or "none of these transfer syntaxes is supported",
                )

        # A PACS sending Storage Commitment results on its own association proposes the SCP role for
        # that SOP class; we accept exactly that. A C-GET requestor proposes the SCP role for the storage
        # classes it wants to receive: granted when the node answers C-GET.
        roles = association.answer_roles(
            rq.user.roles,
            self.settings.scp_role_classes,
            (a for a, _ in info.contexts.values()),
            storage if self.server.qr is not None else (),
        )
        self._requestor_scp = frozenset(r.sop_class_uid for r in roles if r.scp_role and r.sop_class_uid in storage)
        ac = association.build_accept(
            rq,
            answers,
            max_pdu=self.settings.max_pdu,
            implementation_class_uid=self.settings.implementation_class_uid,
            implementation_version_name=self.settings.implementation_version,
            roles=roles,
        )
        _send_quietly(conn, ac.encode())
        self.info = info
        log.info(
            "association %s from %s (%s:%d) accepted, %d of %d presentation contexts",
            info.id,
            calling,
            info.address,
            info.port,
            len(info.contexts),
            len(answers),
            extra={"association_id": info.id, "calling_ae": calling, "called_ae": called, "peer_address": info.address},
        )
        try:
            self.handlers.association_accepted(info)
        except Exception:
            log.exception("association_accepted handler failed")
        return True

    def _syntaxes_for(self, abstract: str) -> tuple[frozenset[str] | None, str]:
        """The transfer syntaxes accepted for ``abstract``, or ``None`` and why it is refused."""
        accepted = self.settings.supported.get(abstract)
        if accepted is not None:
            return accepted, ""
        if abstract in sop_classes.QR_CLASSES:  # only without a Q/R service: else they are in `supported`
            return None, "not a storage service, and Query/Retrieve is not enabled on this node ([qr] enabled = false)"
        if sop_classes.is_other_service(abstract):
            services = (
                "Storage, Verification and Query/Retrieve" if self.server.qr is not None else "Storage and Verification"
            )
            return None, f"not a storage service (this node is a {services} SCP)"
        if not self.settings.unknown_storage:
            return None, "not a standard storage class, and node.accept_unknown_sop_classes is false"
        return self.settings.unknown_storage, ""

    # --- data transfer ------------------------------------------------------

    def _serve(self, conn: PduReader) -> str:
        info = self.info
        assert info is not None
        conn.sock.settimeout(self.settings.network_timeout)
        command_buf = bytearray()
        command: dimse.Command | None = None
        context_id = 0
        while True:
            try:
                pdu_type, length = conn.read_header()
            except PeerClosed as e:
                if self._closing:
                    return "aborted"
                if e.timed_out:
                    log.error(
                        "association %s from %s: no data for node.network_timeout (%.0f s); aborting",
                        info.id,
                        info.calling_ae,
                        self.settings.network_timeout,
                    )
                    _send_quietly(conn, pdu.a_abort())
                    return "timeout"
                return "closed"
            if pdu_type == PduType.P_DATA_TF:
                try:
                    command_buf, command, context_id = self._p_data(conn, length, command_buf, command, context_id)
                    if self._qr_request is not None:
                        self._run_qr(conn)
                except ProtocolError as e:
                    log.error("association %s from %s: %s; aborting", info.id, info.calling_ae, e)
                    _send_quietly(conn, pdu.a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.INVALID_PDU_PARAMETER))
                    return "aborted"
                except PeerClosed as e:
                    if self._closing or isinstance(e, _PeerAborted):
                        return "aborted"
                    if e.timed_out:  # silent in the middle of a PDU
                        log.error(
                            "association %s from %s: no data for node.network_timeout (%.0f s) in the "
                            "middle of a message; aborting",
                            info.id,
                            info.calling_ae,
                            self.settings.network_timeout,
                        )
                        _send_quietly(conn, pdu.a_abort())
                        return "timeout"
                    log.warning(
                        "association %s from %s: connection closed in the middle of a message", info.id, info.calling_ae
                    )
                    return "closed"
            elif pdu_type == PduType.A_RELEASE_RQ:
                conn.read_exact(min(length, MAX_CONTROL_PDU))
                _send_quietly(conn, pdu.A_RELEASE_RP)
                return "released"
            elif pdu_type == PduType.A_ABORT:
                try:
                    conn.read_exact(min(length, MAX_CONTROL_PDU))
                except PeerClosed:
                    pass
                return "aborted"
            else:
                log.error(
                    "association %s from %s: unexpected PDU type 0x%02X; aborting", info.id, info.calling_ae, pdu_type
                )
                # Known PDU types out of place are "unexpected"; others "unrecognised" (PS3.8 9.3.8).
                reason = AbortReason.UNEXPECTED_PDU if pdu_type in _KNOWN_PDU_TYPES else AbortReason.UNRECOGNIZED_PDU
                _send_quietly(conn, pdu.a_abort(AbortSource.SERVICE_PROVIDER, reason))
                return "aborted"

    def _p_data(
        self, conn: PduReader, length: int, command_buf: bytearray, command: dimse.Command | None, context_id: int
    ) -> tuple[bytearray, dimse.Command | None, int]:
        assert self.info is not None  # P-DATA is read only once the association is accepted
        contexts = self.info.contexts
        remaining = length
        while remaining:
            if remaining < 6:
                raise ProtocolError("P-DATA-TF with a truncated PDV item")
            item_len, cx_id, header = PDV_HEAD.unpack(conn.read_exact(6))
            remaining -= 4 + item_len
            if item_len < 2 or remaining < 0:
                raise ProtocolError(f"PDV item length {item_len} does not fit its PDU")
            data_len = item_len - 2
            is_command = header & _COMMAND
            last = header & _LAST
            if cx_id not in contexts:
                raise ProtocolError(f"PDV for presentation context {cx_id}, which was not accepted")
            if is_command:
                if command is not None:
                    raise ProtocolError("a command fragment arrived while a data set was expected")
                if len(command_buf) + data_len > MAX_COMMAND:
                    raise ProtocolError("command set larger than 64 KiB")
                command_buf += conn.read_exact(data_len)
                if last:
                    try:
                        cmd = dimse.decode_command(command_buf)
                    except dimse.CommandError as e:
                        raise ProtocolError(f"undecodable command set: {e}") from None
                    command_buf = bytearray()
                    context_id = cx_id
                    if cmd.has_dataset:
                        command = cmd
                        self._start_dataset(cmd, cx_id)
                    else:
                        self._dispatch(cmd, cx_id)
            else:
                if command is None or (self._rx is None and self._small is None):
                    raise ProtocolError("a data set fragment arrived without its command")
                if cx_id != context_id:
                    raise ProtocolError("a data set fragment arrived on another presentation context")
                if self._small is not None:
                    if len(self._small) + data_len > self._small_limit:
                        raise ProtocolError(
                            f"{_name(command.command_field)} data set larger than {self._small_limit >> 20} MiB"
                        )
                    self._small += conn.read_exact(data_len)
                elif self._rx is not None:  # checked above: a file or the small buffer
                    conn.read_into_chunks(data_len, self._rx.write)
                if last:
                    cmd, command = command, None
                    self._dispatch(cmd, cx_id)
        return command_buf, command, context_id

    def _start_dataset(self, cmd: dimse.Command, cx_id: int) -> None:
        if cmd.command_field == dimse.N_EVENT_REPORT_RQ:
            self._small = bytearray()  # a few references: kept in memory, never a file
            self._small_limit = MAX_EVENT_DATASET
            return
        if cmd.command_field != dimse.C_STORE_RQ:
            if cmd.command_field in _QR_COMMANDS and self.server.qr is not None:
                self._small = bytearray()  # an identifier: a few keys
                self._small_limit = MAX_IDENTIFIER
                return
            raise ProtocolError(f"command 0x{cmd.command_field:04X} with a data set is not supported here")
        info = self.info
        assert info is not None  # a data set is read only once the association is accepted
        abstract, ts = info.contexts[cx_id]
        spare, self._spare = self._spare, None
        # A spare made while the storage was full gets a new try: space may have been freed since.
        rx = spare if spare is not None and spare.error is None else self._new_file()
        self._rx = rx
        rx.write(
            dimse.encode_file_meta(
                cmd.affected_sop_class_uid or abstract,
                cmd.affected_sop_instance_uid,
                ts,
                self.settings.implementation_class_uid,
                self.settings.implementation_version,
                info.calling_ae,
            )
        )
        rx.dataset_offset = rx.size

    def _dispatch(self, cmd: dimse.Command, cx_id: int) -> None:
        info = self.info
        assert info is not None
        abstract, ts = info.contexts[cx_id]
        if cmd.command_field == dimse.C_ECHO_RQ:
            rsp = dimse.encode_response(
                dimse.C_ECHO_RSP, cmd.message_id, Status.SUCCESS, cmd.affected_sop_class_uid or VERIFICATION
            )
            self._conn_send(pdu.p_data(cx_id, rsp))
            return
        if cmd.command_field == dimse.C_CANCEL_RQ:
            if self._qr_request is not None and cmd.responding_to == self._qr_request[0].message_id:
                self._qr_cancel = True  # in the same PDU as the request's identifier
            # otherwise nothing to cancel: every request is answered before the next is read (PS3.7 9.3.2.3)
            return
        if cmd.command_field == dimse.N_EVENT_REPORT_RQ:
            data, self._small = bytes(self._small or b""), None
            event_status = self.handlers.event_report(info, cmd, ts, data)
            rsp = dimse.encode_response(
                dimse.N_EVENT_REPORT_RSP,
                cmd.message_id,
                event_status,
                cmd.affected_sop_class_uid,
                cmd.affected_sop_instance_uid,
                event_type_id=cmd.event_type_id,
            )
            self._conn_send(pdu.p_data(cx_id, rsp))
            return
        if cmd.command_field != dimse.C_STORE_RQ:
            if cmd.command_field in _QR_COMMANDS and (self._small is not None or not cmd.has_dataset):
                if self._qr_request is not None:
                    raise ProtocolError("a second request arrived before the first was answered")
                # Without an identifier (Command Data Set Type 0x0101) it is answered 0xC000, not aborted.
                ident = bytes(self._small) if self._small is not None else None
                self._small = None
                self._qr_request = (cmd, cx_id, ident)
                return
            raise ProtocolError(f"command 0x{cmd.command_field:04X} is not supported by this SCP")
        rx = self._rx
        if rx is None:
            raise ProtocolError("C-STORE-RQ without a data set")
        self._rx = None
        if cmd.affected_sop_class_uid != abstract:
            # PS3.7 9.1.1: the SOP class must be the presentation context's abstract syntax.
            rx.discard()
            status: int = Status.SOP_CLASS_NOT_SUPPORTED
            comment = f"SOP Class {cmd.affected_sop_class_uid} sent on a context for {abstract}"
            log.warning(
                "association %s from %s: refused %s: %s",
                info.id,
                info.calling_ae,
                cmd.affected_sop_instance_uid,
                comment,
            )
            info.failed += 1
        else:
            status, comment = self.handlers.store(info, StoreRequest(cmd, ts, abstract, rx))
        metrics.cstore_response(status)
        rsp = dimse.encode_response(
            dimse.C_STORE_RSP,
            cmd.message_id,
            status,
            cmd.affected_sop_class_uid,
            cmd.affected_sop_instance_uid,
            comment if status else "",  # warnings carry their reason too
        )
        self._conn_send(pdu.p_data(cx_id, rsp))
        # Create the next instance's temp file now, while the sender prepares
        # it: on ext4 a file creation can wait for a journal commit (that other
        # associations' fsyncs started), and here that wait overlaps the network.
        if self._spare is None:
            self._spare = self._new_file()

    def _conn_send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise PeerClosed(str(e)) from None

    # --- Query/Retrieve -----------------------------------------------------

    def _run_qr(self, conn: PduReader) -> None:
        """Run the Q/R request read last through the service and write its final response."""
        assert self._qr_request is not None and self.info is not None
        (cmd, cx_id, data), self._qr_request = self._qr_request, None
        info = self.info
        abstract, ts = info.contexts[cx_id]
        channel = _Channel(self, conn, cmd, cx_id)
        channel._cancel, self._qr_cancel = self._qr_cancel, False
        final = self._qr_final(cmd, abstract, ts, data, channel)
        channel.respond(
            final.status,
            comment=final.comment,
            offending=final.offending,
            remaining=final.remaining,
            completed=final.completed,
            failed=final.failed,
            warning=final.warning,
            identifier=_failed_uid_list(final.failed_uids) if final.failed_uids else None,
        )

    def _qr_final(self, cmd: dimse.Command, abstract: str, ts: str, data: bytes | None, channel: _Channel) -> QRFinal:
        assert self.info is not None
        info, qr = self.info, self.server.qr
        _rsp, classes, name = _QR_COMMANDS[cmd.command_field]
        if qr is None or abstract not in classes or cmd.affected_sop_class_uid != abstract:
            comment = f"{name} for {cmd.affected_sop_class_uid} on a context for {abstract}"
            log.warning("association %s from %s: refused a %s", info.id, info.calling_ae, comment)
            return QRFinal(Status.SOP_CLASS_NOT_SUPPORTED, comment)
        if data is None:
            log.warning("association %s from %s: a %s without an identifier", info.id, info.calling_ae, name)
            return QRFinal(QRStatus.UNABLE_TO_PROCESS, f"a {name} needs an identifier (the keys to match)")
        try:
            identifier = decode_dataset(io.BytesIO(data), ts == _IMPLICIT, True, ts == _DEFLATED)
            identifier.walk(lambda _ds, _elem: None)  # values decode lazily: fail here, not in the service
        except Exception as e:
            log.warning("association %s from %s: unreadable %s identifier: %s", info.id, info.calling_ae, name, e)
            return QRFinal(QRStatus.UNABLE_TO_PROCESS, f"the identifier cannot be read: {e}")
        try:
            if cmd.command_field == dimse.C_FIND_RQ:
                return qr.find(info, abstract, identifier, channel)
            if cmd.command_field == dimse.C_MOVE_RQ:
                return qr.move(info, abstract, identifier, cmd.move_destination, channel)
            return qr.get(info, abstract, identifier, channel)
        except (PeerClosed, ProtocolError):
            raise
        except Exception:
            log.exception("association %s from %s: the %s failed", info.id, info.calling_ae, name)
            return QRFinal(QRStatus.UNABLE_TO_PROCESS, f"{name} failed in the node: see its log")

    def _send_parts(self, *parts: bytes | memoryview) -> None:
        """One PDU from its pieces (headers and a view of a buffer), without joining them."""
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                for p in parts:
                    self.sock.sendall(p)
                return
            total = sum(len(p) for p in parts)
            sent = self.sock.sendmsg(parts)
            if sent < total:  # a partial write: send the rest plainly
                self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])
        except OSError as e:
            raise PeerClosed(str(e), timed_out=isinstance(e, TimeoutError)) from None

    def _fragment(self) -> int:
        """Data per P-DATA-TF: the PDU body is a PDV item (4-byte length, context id, header) plus data."""
        assert self.info is not None
        return self.info.max_pdu - 6 if self.info.max_pdu else UNLIMITED_FRAGMENT

    def _send_dataset(self, cx_id: int, data: bytes) -> None:
        """An encoded data set in PDVs of at most the peer's Maximum Length."""
        step = self._fragment()
        view = memoryview(data)
        if not data:
            self._send_parts(pdu.p_data_header(cx_id, 0, _LAST))
        for start in range(0, len(data), step):
            part = view[start : start + step]
            last = start + len(part) >= len(data)
            self._send_parts(pdu.p_data_header(cx_id, len(part), _LAST if last else 0), part)

    def _send_file(self, cx_id: int, f: io.RawIOBase, offset: int, size: int, name: str) -> None:
        """A stored file's data set (from ``offset``), streamed in PDVs of at most the peer's Maximum Length."""
        left = size - offset
        if left <= 0:
            self._send_parts(pdu.p_data_header(cx_id, 0, _LAST))
            return
        chunk = min(self._fragment(), 1 << 22)
        view = memoryview(bytearray(min(chunk, left)))
        f.seek(offset)
        while left:
            try:
                n = f.readinto(view[: min(chunk, left)])
            except OSError as e:
                raise ProtocolError(f"{name} could not be read while sending it ({e})") from None
            if not n:
                raise ProtocolError(f"{name} ended {left} bytes early while sending it")
            left -= n
            self._send_parts(pdu.p_data_header(cx_id, n, 0 if left else _LAST), view[:n])

    def _storage_context(self, sop_class: str, transfer_syntax: str) -> int | None:
        """An accepted context for ``sop_class`` in ``transfer_syntax`` on which the requestor is SCP."""
        assert self.info is not None
        if sop_class not in self._requestor_scp:
            return None
        for cx_id, (abstract, ts) in self.info.contexts.items():
            if abstract == sop_class and ts == transfer_syntax:
                return cx_id
        return None

    def _next_sub_message_id(self) -> int:
        self._sub_message_id = self._sub_message_id % 0xFFFF + 1
        return self._sub_message_id


#: Identifiers are read and written in the context's syntax: one of these or Explicit VR Little Endian.
_IMPLICIT, _DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"


def _name(command_field: int) -> str:
    known = _QR_COMMANDS.get(command_field)
    return (
        known[2]
        if known
        else "N-EVENT-REPORT"
        if command_field == dimse.N_EVENT_REPORT_RQ
        else f"0x{command_field:04X}"
    )


#: The longest value a 2-byte length (Explicit VR UI) holds: a longer Failed SOP Instance UID List would be
#: written as UN by pydicom, which requestors do not read as the list.
_UI_MAX = 0xFFFE


def _failed_uid_list(uids: tuple[str, ...]) -> Dataset:
    """The Failed SOP Instance UID List (0008,0058) of a final response: the first UIDs that fit in one UI value.

    The counts in the command stay true; the UIDs left out are logged (the node's log has them all).
    """
    kept, size = [], -1
    for uid in uids:
        size += len(uid) + 1
        if size > _UI_MAX:
            break
        kept.append(uid)
    if len(kept) < len(uids):
        log.warning(
            "Failed SOP Instance UID List: %d of %d UID(s) fit in the response; not listed there: %s",
            len(kept),
            len(uids),
            "\\".join(uids[len(kept) :]),
        )
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = kept
    return ds


class _Channel:
    """:class:`QRChannel` for one Q/R request: writes its responses, reads what the requestor sends meanwhile."""

    def __init__(self, assoc: Association, conn: PduReader, request: dimse.Command, cx_id: int) -> None:
        assert assoc.info is not None
        self._assoc = assoc
        self._conn = conn
        self._request = request
        self._cx_id = cx_id
        self.abstract_syntax, self._ts = assoc.info.contexts[cx_id]
        self._rsp_field = _QR_COMMANDS[request.command_field][0]
        self._cancel = False
        self._command = bytearray()
        self._next_poll = 0.0
        self._calls = 0

    # --- responses --------------------------------------------------------

    def respond(
        self,
        status: int,
        *,
        comment: str = "",
        offending: tuple[int, ...] = (),
        remaining: int | None = None,
        completed: int | None = None,
        failed: int | None = None,
        warning: int | None = None,
        identifier: Dataset | Sequence[dimse.Element] | None = None,
    ) -> None:
        data: bytes | None = None
        if isinstance(identifier, Dataset):
            data = encode_dataset(identifier, self._ts == _IMPLICIT, True, self._ts == _DEFLATED)
            if data is None:
                raise ValueError("the response identifier cannot be encoded")
        elif identifier is not None:
            data = dimse.encode_identifier(identifier, self._ts == _IMPLICIT)
            if self._ts == _DEFLATED:
                deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
                data = deflate.compress(data) + deflate.flush()
                data += b"\x00" if len(data) % 2 else b""
        command = dimse.encode_response(
            self._rsp_field,
            self._request.message_id,
            status,
            self._request.affected_sop_class_uid,
            error_comment=comment,
            remaining=remaining,
            completed=completed,
            failed=failed,
            warning=warning,
            offending=offending,
            has_dataset=data is not None,
        )
        message = pdu.p_data(self._cx_id, command)
        if data is not None and 0 < len(data) <= self._assoc._fragment():
            # A match and its command in one write: one system call per response, not two.
            self._assoc._conn_send(message + pdu.p_data(self._cx_id, data, pdu.Pdv.LAST))
            return
        self._assoc._conn_send(message)
        if data is not None:
            self._assoc._send_dataset(self._cx_id, data)

    def pending(
        self,
        identifier: Dataset | Sequence[dimse.Element] | None = None,
        *,
        remaining: int | None = None,
        completed: int | None = None,
        failed: int | None = None,
        warning: int | None = None,
        status: int = QRStatus.PENDING,
    ) -> None:
        self.respond(
            status, remaining=remaining, completed=completed, failed=failed, warning=warning, identifier=identifier
        )

    # --- what the requestor sends meanwhile ----------------------------------

    def cancelled(self) -> bool:
        now = time.monotonic()
        self._calls += 1
        due = now >= self._next_poll or self._calls >= CANCEL_POLL_CALLS or self._conn.start < self._conn.end
        if not self._cancel and due:
            self._next_poll, self._calls = now + CANCEL_POLL, 0
            self._poll_cancel()
        return self._cancel

    def _poll_cancel(self) -> None:
        """Read what the requestor sent meanwhile: a C-CANCEL-RQ for this request sets ``_cancel``."""
        while not self._cancel and self._readable():
            self._read_pdu()

    def _readable(self) -> bool:
        conn, sock = self._conn, self._assoc.sock
        if conn.start < conn.end:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return bool(select.select([sock], [], [], 0)[0])

    def _read_pdu(self) -> dimse.Command | None:
        """Read one PDU: a C-CANCEL-RQ for this request is remembered; a complete C-STORE-RSP is returned."""
        info = self._assoc.info
        assert info is not None
        pdu_type, length = self._conn.read_header()
        if pdu_type == PduType.A_ABORT:
            try:
                self._conn.read_exact(min(length, MAX_CONTROL_PDU))
            except PeerClosed:
                pass
            log.info("association %s from %s: aborted by the peer during a %s", info.id, info.calling_ae, self._name)
            raise _PeerAborted("the peer aborted the association")
        if pdu_type != PduType.P_DATA_TF:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} while a {self._name} was being answered")
        if length > MAX_COMMAND + 64:
            raise ProtocolError(f"a P-DATA-TF of {length} bytes while a {self._name} was being answered")
        try:
            pdvs = list(pdu.iter_pdvs(self._conn.read_exact(length)))
        except pdu.PduError as e:
            raise ProtocolError(str(e)) from None
        done = None
        for cx_id, header, data in pdvs:
            if cx_id not in info.contexts:
                raise ProtocolError(f"PDV for presentation context {cx_id}, which was not accepted")
            if not header & _COMMAND:
                raise ProtocolError(f"a data set fragment while a {self._name} was being answered")
            self._command += data
            if len(self._command) > MAX_COMMAND:
                raise ProtocolError("command set larger than 64 KiB")
            if header & _LAST:
                try:
                    cmd = dimse.decode_command(self._command)
                except dimse.CommandError as e:
                    raise ProtocolError(f"undecodable command set: {e}") from None
                self._command = bytearray()
                if cmd.command_field == dimse.C_CANCEL_RQ:
                    if cmd.responding_to == self._request.message_id:
                        self._cancel = True
                elif cmd.command_field == dimse.C_STORE_RSP and not cmd.has_dataset:
                    done = cmd
                else:
                    raise ProtocolError(
                        f"command 0x{cmd.command_field:04X} while a {self._name} was being answered "
                        "(asynchronous operations are not negotiated)"
                    )
        return done

    @property
    def _name(self) -> str:
        return _name(self._request.command_field)

    # --- C-GET sub-operations ---------------------------------------------------

    def store(
        self,
        path: Path,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        move_originator: tuple[str, int] | None = None,
    ) -> tuple[int, str]:
        assoc = self._assoc
        cx_id = assoc._storage_context(sop_class, transfer_syntax)
        if cx_id is None:
            return (
                Status.SOP_CLASS_NOT_SUPPORTED,
                f"no presentation context for {sop_class} in {transfer_syntax} with the SCP role for the requestor",
            )
        try:
            f = open(path, "rb", buffering=0)
        except OSError as e:
            return Status.PROCESSING_FAILURE, f"the stored file cannot be read: {e.strerror}"
        with f:
            try:
                size = os.fstat(f.fileno()).st_size
                offset = dimse.dataset_offset(f.read(144), path.name)
            except (OSError, ValueError) as e:
                return Status.PROCESSING_FAILURE, f"the stored file cannot be sent: {e}"
            msg_id = assoc._next_sub_message_id()
            ae, originator_id = move_originator if move_originator is not None else ("", None)
            command = dimse.encode_c_store_rq(msg_id, sop_class, sop_instance, 0, ae, originator_id)
            assoc._conn_send(pdu.p_data(cx_id, command))
            assoc._send_file(cx_id, f, offset, size, path.name)
        while True:
            rsp = self._read_pdu()
            if rsp is None:
                continue
            if rsp.responding_to != msg_id:
                raise ProtocolError(f"a C-STORE-RSP for message {rsp.responding_to} while waiting for {msg_id}")
            if rsp.status is None:
                return Status.PROCESSING_FAILURE, "the C-STORE-RSP has no Status"
            return rsp.status, rsp.error_comment


class Acceptor:
    """Listens, admits associations up to the limit, and stops cleanly."""

    def __init__(
        self, settings: AcceptorSettings, handlers: Handlers, host: str, port: int, qr: QRService | None = None
    ) -> None:
        """``qr``: the Query/Retrieve service; with it, C-FIND, C-MOVE and C-GET requests are answered
        (the Q/R SOP classes must be in ``settings.supported`` too)."""
        self.settings = settings
        self.handlers = handlers
        self.qr = qr
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._active: set[Association] = set()
        self._admitted: set[Association] = set()
        #: Connections still to send their A-ASSOCIATE-RQ -> when node.acse_timeout runs out.
        self._pending: dict[Association, float] = {}
        self._pending_by_address: dict[str, int] = {}
        self._stopping = threading.Event()
        self._refused_log = _Throttled()
        self._expired_log = _Throttled()

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.settings.reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        s.settimeout(0.5)
        self._sock = s
        self.port = s.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="acceptor", daemon=True)
        self._thread.start()

    @property
    def listening(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            self._expire_pending()
            try:
                client, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            host = address[0]
            a = Association(self, client, address[:2])
            with self._lock:
                limit = self._pending_limit(host)
                if limit is None:
                    self._pending[a] = time.monotonic() + self.settings.acse_timeout
                    self._pending_by_address[host] = self._pending_by_address.get(host, 0) + 1
                    self._active.add(a)
            if limit is not None:
                self._refuse(client, address[:2], limit)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.settimeout(None)
            a.start()

    def _pending_limit(self, host: str) -> str | None:
        """Make room for a new connection from ``host`` among those not yet associated (lock held).

        Over the per-address limit, the new connection is refused: that address holds enough. Over
        the overall limit, the connection waiting longest is cut off instead: a real sender's request
        takes milliseconds, so the oldest ones are the idle or trickling ones, and a flood from many
        addresses then churns itself rather than locking every sender out.
        """
        if self._pending_by_address.get(host, 0) >= self.settings.max_pending_per_address:
            return f"node.max_pending_per_address ({self.settings.max_pending_per_address})"
        if len(self._pending) >= self.settings.max_pending:
            waiting = [a for a in self._pending if not a.cut_off]
            # Cut-off ones leave within milliseconds; a flood faster than that is refused outright.
            if not waiting or len(self._pending) >= 2 * self.settings.max_pending:
                return f"node.max_pending_connections ({self.settings.max_pending})"
            self._cut(min(waiting, key=self._pending.__getitem__), "pending-limit")
        return None

    def _refuse(self, client: socket.socket, address: tuple[str, int], limit: str) -> None:
        """Close a connection over a pending limit at once: no thread, no buffer, nothing read."""
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: no TIME_WAIT
            client.close()
        except OSError:
            pass
        metrics.ASSOCIATIONS_REJECTED.labels("pending-limit").inc()
        self._refused_log.warning(
            "closed a connection from %s:%d at once: %s reached (connections still to send their association request)",
            address[0],
            address[1],
            limit,
        )

    @staticmethod
    def _cut(a: Association, why: str) -> None:
        """End a pending connection from the acceptor's thread: its own thread's read returns at once."""
        a.cut_off = why
        try:
            a.raw_sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _expire_pending(self) -> None:
        """Cut off connections whose association request is not complete node.acse_timeout after connecting."""
        now = time.monotonic()
        with self._lock:
            for a, deadline in self._pending.items():
                if deadline <= now and not a.cut_off:
                    self._cut(a, "acse-timeout")

    def log_cut_off(self, a: Association, waiting_for: str) -> None:
        """The thread of a connection the acceptor cut off tells (throttled) and counts it."""
        metrics.ASSOCIATIONS_REJECTED.labels(a.cut_off).inc()
        if a.cut_off == "acse-timeout":
            self._expired_log.warning(
                "closed the connection from %s:%d: %s not complete within node.acse_timeout (%.0f s) of connecting",
                a.address[0],
                a.address[1],
                waiting_for,
                self.settings.acse_timeout,
            )
        else:
            self._refused_log.warning(
                "closed the connection from %s:%d, the longest waiting for its %s, to make "
                "room: node.max_pending_connections (%d) reached",
                a.address[0],
                a.address[1],
                waiting_for,
                self.settings.max_pending,
            )

    def _not_pending(self, a: Association) -> None:
        """``a`` sent its association request or went away (lock held)."""
        if self._pending.pop(a, None) is not None:
            host = a.address[0]
            left = self._pending_by_address[host] - 1
            if left:
                self._pending_by_address[host] = left
            else:
                del self._pending_by_address[host]

    def requested(self, a: Association) -> None:
        """``a`` has sent a complete A-ASSOCIATE-RQ: it no longer counts as pending."""
        with self._lock:
            self._not_pending(a)

    def _admit(self, a: Association) -> bool:
        with self._lock:
            if len(self._admitted) >= self.settings.max_associations:
                return False
            self._admitted.add(a)
            return True

    def _finished(self, a: Association) -> None:
        with self._lock:
            self._not_pending(a)
            self._active.discard(a)
            self._admitted.discard(a)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop accepting; give open associations ``timeout`` seconds to finish, then abort them.

        Returns ``True`` if every association ended by itself (nothing was aborted).
        """
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._active:
                    break
            time.sleep(0.05)
        with self._lock:
            left = list(self._active)
        for a in left:
            log.warning("aborting association from %s at shutdown (still open after %.0f s)", a.address[0], timeout)
            a.abort()
        for a in left:
            a.join(5)
        return not left
