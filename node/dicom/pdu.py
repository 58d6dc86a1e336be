"""DICOM Upper Layer PDUs (PS3.8 9.3): their types, constants, encodings and the reader both roles use.

Everything that goes on the wire for association control is built and parsed here, once: the
acceptor (:mod:`node.receive.acceptor`), the requestor (:mod:`node.send.requestor`) and the tests
that send deliberately broken PDUs all use these functions. Codes are IntEnums, so a call site says
``AbortReason.UNEXPECTED_PDU`` rather than ``0x02``.

The data path stays allocation-free: :func:`p_data_header` returns the 12 bytes in front of a
data fragment (the caller sends it together with a view of its buffer), and :class:`PduReader`
reads into one reusable buffer and hands fragments to a sink as views.

References: PDU structure 9.3.1, A-ASSOCIATE-RQ/AC 9.3.2-9.3.3 (items 9.3.2.1-9.3.2.3, user
information Annex D.3.3), A-ASSOCIATE-RJ 9.3.4, P-DATA-TF 9.3.5 and Annex E.2, A-RELEASE 9.3.6-9.3.7,
A-ABORT 9.3.8.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

#: The DICOM application context name (PS3.7 A.2.1); the only one there is.
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PROTOCOL_VERSION = 0x0001
#: PDU header: type, reserved, length (big endian).
PDU_HEAD = struct.Struct(">BxL")
#: PDV item header: length, presentation context id, message control header.
PDV_HEAD = struct.Struct(">LBB")
#: Largest association-control PDU read into memory (an A-ASSOCIATE-RQ is a few KiB).
MAX_CONTROL_PDU = 1 << 20


class PduType(IntEnum):
    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class Pdv(IntFlag):
    """The message control header of a PDV (PS3.8 E.2): bit 0 command, bit 1 last fragment."""

    DATA = 0x00
    COMMAND = 0x01
    LAST = 0x02


class AbortSource(IntEnum):
    """Who aborted (PS3.8 table 9-26)."""

    SERVICE_USER = 0x00
    RESERVED = 0x01
    SERVICE_PROVIDER = 0x02


class AbortReason(IntEnum):
    """Why the service provider aborted (PS3.8 table 9-26); 0 when the service user aborts."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER = 0x06


ABORT_SOURCE_TEXT: dict[int, str] = {
    AbortSource.SERVICE_USER: "the peer's application (service user)",
    AbortSource.RESERVED: "reserved",
    AbortSource.SERVICE_PROVIDER: "the peer's DICOM stack (service provider)",
}


class RejectResult(IntEnum):
    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    SERVICE_USER = 0x01
    ACSE = 0x02  # service provider, ACSE related function
    PRESENTATION = 0x03  # service provider, presentation related function


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ's result, source and reason (PS3.8 table 9-21); the reason depends on the source."""

    result: int
    source: int
    reason: int

    @property
    def text(self) -> str:
        kind = "permanent" if self.result == RejectResult.PERMANENT else "transient"
        source, reasons = _REJECT_REASONS.get(self.source, (f"source {self.source}", {}))
        return f"{kind}, {source}: {reasons.get(self.reason, f'reason {self.reason}')}"


_REJECT_REASONS: dict[int, tuple[str, dict[int, str]]] = {
    RejectSource.SERVICE_USER: (
        "service user",
        {
            1: "no reason given",
            2: "application context name not supported",
            3: "calling AE title not recognised",
            7: "called AE title not recognised",
        },
    ),
    RejectSource.ACSE: ("service provider (ACSE)", {1: "no reason given", 2: "protocol version not supported"}),
    RejectSource.PRESENTATION: (
        "service provider (presentation)",
        {1: "temporary congestion", 2: "local limit exceeded"},
    ),
}

NO_REASON = Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 1)
APPLICATION_CONTEXT_NOT_SUPPORTED = Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 2)
CALLING_AE_NOT_RECOGNIZED = Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 3)
CALLED_AE_NOT_RECOGNIZED = Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 7)
PROTOCOL_VERSION_NOT_SUPPORTED = Rejection(RejectResult.PERMANENT, RejectSource.ACSE, 2)
LOCAL_LIMIT_EXCEEDED = Rejection(RejectResult.TRANSIENT, RejectSource.PRESENTATION, 2)


class ContextResult(IntEnum):
    """A presentation context's result in the A-ASSOCIATE-AC (PS3.8 table 9-18)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class PduError(ValueError):
    """The bytes are not a well-formed PDU of the kind expected."""


class PeerClosed(Exception):
    """The connection closed (or timed out) under us."""

    def __init__(self, why: str, *, timed_out: bool = False) -> None:
        super().__init__(why)
        self.timed_out = timed_out


# --- fixed-size PDUs --------------------------------------------------------------------------------

A_RELEASE_RQ = PDU_HEAD.pack(PduType.A_RELEASE_RQ, 4) + b"\x00\x00\x00\x00"
A_RELEASE_RP = PDU_HEAD.pack(PduType.A_RELEASE_RP, 4) + b"\x00\x00\x00\x00"


def a_abort(
    source: AbortSource = AbortSource.SERVICE_PROVIDER, reason: AbortReason = AbortReason.NOT_SPECIFIED
) -> bytes:
    return PDU_HEAD.pack(PduType.A_ABORT, 4) + bytes((0, 0, source, reason))


def decode_a_abort(body: bytes) -> tuple[int, int]:
    """(source, reason) of an A-ABORT body; a short body reads as (0, 0)."""
    return (body[2] if len(body) > 2 else 0, body[3] if len(body) > 3 else 0)


def a_associate_rj(rejection: Rejection) -> bytes:
    return PDU_HEAD.pack(PduType.A_ASSOCIATE_RJ, 4) + bytes((0, rejection.result, rejection.source, rejection.reason))


def decode_a_associate_rj(body: bytes) -> Rejection:
    if len(body) < 4:
        raise PduError(f"A-ASSOCIATE-RJ of {len(body)} bytes, not 4")
    return Rejection(body[1], body[2], body[3])


# --- P-DATA-TF ---------------------------------------------------------------------------------------


def p_data_header(context_id: int, length: int, flags: int) -> bytes:
    """The PDU and PDV headers in front of ``length`` bytes of one fragment (sent with it, not copied into it)."""
    return PDU_HEAD.pack(PduType.P_DATA_TF, length + 6) + PDV_HEAD.pack(length + 2, context_id, flags)


def p_data(context_id: int, data: bytes, flags: int = Pdv.COMMAND | Pdv.LAST) -> bytes:
    """One P-DATA-TF holding one PDV (by default a complete command set)."""
    return p_data_header(context_id, len(data), flags) + data


def iter_pdvs(body: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The PDVs of a P-DATA-TF body: (context id, message control header, data)."""
    view = memoryview(body)
    pos = 0
    while pos < len(view):
        if pos + 6 > len(view):
            raise PduError("P-DATA-TF with a truncated PDV item")
        length, cx_id, header = PDV_HEAD.unpack_from(view, pos)
        if length < 2 or pos + 4 + length > len(view):
            raise PduError(f"PDV item length {length} does not fit its PDU")
        yield cx_id, header, view[pos + 6 : pos + 4 + length]
        pos += 4 + length


# --- A-ASSOCIATE-RQ / AC -----------------------------------------------------------------------------

_ITEM_HEAD = struct.Struct(">BxH")
_ASSOC_FIXED = 68  # protocol version, reserved, called AE, calling AE, 32 reserved


@dataclass
class ContextProposal:
    """A presentation context item of the A-ASSOCIATE-RQ (PS3.8 9.3.2.2)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]
    #: The item's three reserved bytes as received ("sent as 00H, not tested": DCMTK sends 00 FF 00).
    reserved: bytes = field(default=b"\x00\x00\x00", repr=False, compare=False)


@dataclass
class ContextAnswer:
    """A presentation context item of the A-ASSOCIATE-AC (PS3.8 9.3.3.2): the one transfer syntax chosen."""

    id: int
    result: int
    transfer_syntax: str


@dataclass
class RoleSelection:
    """SCP/SCU Role Selection (PS3.7 D.3.3.4): which roles a side proposes or accepts for a SOP class."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass
class UserInformation:
    """The user information item (PS3.7 D.3.3); sub-items not interpreted here are kept as they came."""

    #: Largest P-DATA-TF the sender of this item accepts; 0: unlimited, None: not sent.
    max_pdu: int | None = None
    implementation_class_uid: str = ""
    implementation_version_name: str | None = None
    #: Asynchronous Operations Window (invoked, performed); None: not sent (1, 1).
    async_ops: tuple[int, int] | None = None
    roles: list[RoleSelection] = field(default_factory=list)
    #: (sub-item type, value) of the others (extended negotiation, user identity, ...).
    other: list[tuple[int, bytes]] = field(default_factory=list)

    #: Sub-item types in the order they came, so that a decoded item encodes to the same bytes
    #: (senders order them differently; PS3.8 does not fix an order). Empty: 51, 52, 53, 54, 55, others.
    order: list[int] = field(default_factory=list, repr=False, compare=False)

    def encode(self) -> bytes:
        parts: dict[int, list[bytes]] = {}
        if self.max_pdu is not None:
            parts[0x51] = [_item(0x51, self.max_pdu.to_bytes(4, "big"))]
        parts[0x52] = [_item(0x52, _uid_bytes(self.implementation_class_uid))]
        if self.async_ops is not None:
            parts[0x53] = [_item(0x53, struct.pack(">HH", *self.async_ops))]
        for r in self.roles:
            uid = _uid_bytes(r.sop_class_uid)
            parts.setdefault(0x54, []).append(
                _item(0x54, len(uid).to_bytes(2, "big") + uid + bytes((r.scu_role, r.scp_role)))
            )
        if self.implementation_version_name is not None:
            parts[0x55] = [_item(0x55, self.implementation_version_name.encode("ascii", "replace"))]
        for kind, value in self.other:
            parts.setdefault(kind, []).append(_item(kind, value))
        out = [parts[kind].pop(0) for kind in self.order if parts.get(kind)]
        out.extend(item for kind in sorted(parts) for item in parts[kind])
        return _item(0x50, b"".join(out))

    @classmethod
    def decode(cls, value: bytes) -> UserInformation:
        out = cls()
        for kind, sub in _items(value, "user information"):
            out.order.append(kind)
            if kind == 0x51:
                if len(sub) != 4:
                    raise PduError(f"maximum length sub-item of {len(sub)} bytes, not 4")
                out.max_pdu = int.from_bytes(sub, "big")
            elif kind == 0x52:
                out.implementation_class_uid = _uid_text(sub)
            elif kind == 0x53:
                if len(sub) != 4:
                    raise PduError(f"asynchronous operations window sub-item of {len(sub)} bytes, not 4")
                out.async_ops = struct.unpack(">HH", sub)
            elif kind == 0x54:
                n = int.from_bytes(sub[:2], "big")
                if len(sub) != n + 4:
                    raise PduError("SCP/SCU role selection sub-item with a wrong UID length")
                out.roles.append(RoleSelection(_uid_text(sub[2 : 2 + n]), bool(sub[2 + n]), bool(sub[3 + n])))
            elif kind == 0x55:
                out.implementation_version_name = sub.decode("ascii", "replace")
            else:
                out.other.append((kind, sub))
        return out


@dataclass
class AssociateRQ:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2)."""

    called_ae: str
    calling_ae: str
    contexts: list[ContextProposal]
    user: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        items = [
            _item(
                0x20,
                bytes((cx.id,))
                + cx.reserved
                + _item(0x30, _uid_bytes(cx.abstract_syntax))
                + b"".join(_item(0x40, _uid_bytes(ts)) for ts in cx.transfer_syntaxes),
            )
            for cx in self.contexts
        ]
        return _encode_associate(PduType.A_ASSOCIATE_RQ, self, items)

    @classmethod
    def decode(cls, body: bytes) -> AssociateRQ:
        version, called, calling, app, raw_contexts, user = _decode_associate(body, 0x20)
        _check_ae(called, "called")
        _check_ae(calling, "calling")
        contexts = []
        for value in raw_contexts:
            abstract, syntaxes = "", []
            for kind, sub in _items(value[4:], "presentation context"):
                if kind == 0x30:
                    abstract = _uid_text(sub)
                elif kind == 0x40:
                    syntaxes.append(_uid_text(sub))
            if not abstract or not syntaxes:
                raise PduError(f"presentation context {value[0]} without an abstract syntax or transfer syntax")
            contexts.append(ContextProposal(value[0], abstract, syntaxes, bytes(value[1:4])))
        return cls(called, calling, contexts, user, app, version)


@dataclass
class AssociateAC:
    """An A-ASSOCIATE-AC (PS3.8 9.3.3); the AE titles are the request's, returned as they came."""

    called_ae: str
    calling_ae: str
    contexts: list[ContextAnswer]
    user: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        items = [
            _item(0x21, bytes((cx.id, 0, cx.result, 0)) + _item(0x40, _uid_bytes(cx.transfer_syntax)))
            for cx in self.contexts
        ]
        return _encode_associate(PduType.A_ASSOCIATE_AC, self, items)

    @classmethod
    def decode(cls, body: bytes) -> AssociateAC:
        version, called, calling, app, raw_contexts, user = _decode_associate(body, 0x21)
        contexts = []
        for value in raw_contexts:
            ts = next((_uid_text(sub) for kind, sub in _items(value[4:], "presentation context") if kind == 0x40), "")
            contexts.append(ContextAnswer(value[0], value[2], ts))
        return cls(called, calling, contexts, user, app, version)


def _encode_associate(kind: PduType, pdu: AssociateRQ | AssociateAC, contexts: list[bytes]) -> bytes:
    body = b"".join(
        [
            struct.pack(">HH16s16s32x", pdu.protocol_version, 0, _ae(pdu.called_ae), _ae(pdu.calling_ae)),
            _item(0x10, _uid_bytes(pdu.application_context)),
            *contexts,
            pdu.user.encode(),
        ]
    )
    return PDU_HEAD.pack(kind, len(body)) + body


def _check_ae(title: str, which: str) -> None:
    """An AE title of an A-ASSOCIATE-RQ: the default repertoire without backslash or control characters, not
    only spaces (PS3.5 6.2); anything else would reach the index, the audit and every stored file's File Meta."""
    if not title:
        raise PduError(f"the {which} AE title is empty or only spaces")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E for c in title):
        raise PduError(f"the {which} AE title {title!r} holds a backslash or a control or non-ASCII character")


def _decode_associate(body: bytes, context_item: int) -> tuple[int, str, str, str, list[bytes], UserInformation]:
    if len(body) < _ASSOC_FIXED:
        raise PduError(f"A-ASSOCIATE PDU of {len(body)} bytes, shorter than its fixed fields")
    version = int.from_bytes(body[:2], "big")
    called = body[4:20].decode("ascii", "replace").strip()
    calling = body[20:36].decode("ascii", "replace").strip()
    app = ""
    contexts: list[bytes] = []
    user = None
    for kind, value in _items(body[_ASSOC_FIXED:], "A-ASSOCIATE"):
        if kind == 0x10:
            app = _uid_text(value)
        elif kind == context_item:
            if len(value) < 4:
                raise PduError(f"presentation context item of {len(value)} bytes")
            contexts.append(value)
        elif kind == 0x50:
            user = UserInformation.decode(value)
    if not app:
        raise PduError("A-ASSOCIATE without an application context item")
    if user is None:
        raise PduError("A-ASSOCIATE without a user information item")
    return version, called, calling, app, contexts, user


def _items(data: bytes, where: str) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise PduError(f"{where}: truncated item header at byte {pos}")
        kind, length = _ITEM_HEAD.unpack_from(data, pos)
        if pos + 4 + length > len(data):
            raise PduError(f"{where}: item 0x{kind:02X} of {length} bytes overruns its PDU")
        yield kind, data[pos + 4 : pos + 4 + length]
        pos += 4 + length


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM_HEAD.pack(kind, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16)


def _uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii", "replace")


def _uid_text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


# --- reading ----------------------------------------------------------------------------------------

#: Data set fragments are handed on in pieces of at most this size.
CHUNK = 1 << 20


class PduReader:
    """Buffered reads from a socket: one ``recv`` takes whatever has arrived.

    A small C-STORE (PDU and PDV headers, command, data set) then costs one or two system calls
    instead of eight, which matters because every system call is also a GIL hand-off between
    associations. Data set fragments go to a sink as views of the buffer, never copied here.
    """

    def __init__(self, sock: socket.socket, size: int = CHUNK) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0  # unread bytes are buf[start:end]
        self.end = 0

    def grow(self, size: int) -> None:
        """Enlarge the buffer (once the association is accepted), keeping what is unread."""
        if size <= len(self.buf):
            return
        unread = bytes(self.view[self.start : self.end])
        buf = bytearray(size)
        buf[: len(unread)] = unread
        self.buf, self.view = buf, memoryview(buf)
        self.start, self.end = 0, len(unread)

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):  # move the unread tail to the front
            n = self.end - self.start
            self.buf[:n] = self.view[self.start : self.end]
            self.start, self.end = 0, n
        try:
            k = self.sock.recv_into(self.view[self.end :])
        except TimeoutError:
            raise PeerClosed("timeout", timed_out=True) from None
        except OSError as e:
            raise PeerClosed(str(e)) from None
        if not k:
            raise PeerClosed("the peer closed the connection")
        self.end += k

    def read_header(self) -> tuple[int, int]:
        """The next PDU's (type, length)."""
        return PDU_HEAD.unpack(self.read_exact(6))

    def read_pdu(self, limit: int) -> tuple[int, bytes]:
        """The next PDU's type and body; a longer one than ``limit`` is a :class:`PduError`."""
        kind, length = self.read_header()
        if length > limit:
            raise PduError(f"a PDU of {length} bytes (type 0x{kind:02X}) is larger than allowed")
        return kind, self.read_exact(length)

    def read_exact(self, n: int) -> bytes:
        if n > len(self.buf):  # never for PDUs we accept, but stay correct
            parts: list[bytes] = []
            self.read_into_chunks(n, lambda v: parts.append(bytes(v)))
            return b"".join(parts)
        while self.end - self.start < n:
            if len(self.buf) - self.start < n:  # not enough room after start: compact first
                m = self.end - self.start
                self.buf[:m] = self.view[self.start : self.end]
                self.start, self.end = 0, m
            self._fill()
        out = bytes(self.view[self.start : self.start + n])
        self.start += n
        return out

    def read_into_chunks(self, n: int, sink: Callable[[memoryview], object]) -> None:
        """Hand the next ``n`` bytes to ``sink`` in pieces of at most the buffer's size, as they arrive."""
        while n:
            if self.start == self.end:
                self._fill()
            take = min(self.end - self.start, n)
            sink(self.view[self.start : self.start + take])
            self.start += take
            n -= take
