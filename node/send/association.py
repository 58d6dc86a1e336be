"""A requestor association written directly on the socket: the SCU's fast path.

pynetdicom's association runs two threads that hand every PDU and DIMSE
message through queues and builds a pydicom Dataset for every command set;
for a stream of C-STOREs that cost ~2 ms per instance, more than a PACS
takes to store one. Here the sending thread does everything itself: it
writes the command set (:mod:`node.receive.dimse`), streams the data set from
the file in PDU-sized fragments, and reads the response off the same socket.
pynetdicom still encodes and decodes the association-control PDUs (PS3.8
9.3.2-9.3.4), which happen once per association.

Errors say what happened, because the caller decides from them whether to
try again: :class:`ConnectFailed` (no TCP connection), :class:`Rejected`
(A-ASSOCIATE-RJ, with its result, source and reason), :class:`PeerAborted`
(A-ABORT, and whether the peer's application or its provider sent it) and
:class:`Lost` (the connection closed or went silent).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from node.receive import dimse
from node.receive.scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
_PDU_HEAD = struct.Struct(">BxL")
_PDV_HEAD = struct.Struct(">LBB")
#: Our largest accepted PDU when the caller gives none (what we tell the peer).
DEFAULT_MAX_PDU = 1 << 20
#: Data set fragments when the peer accepts PDUs of any size.
UNLIMITED_FRAGMENT = 1 << 20
MAX_CONTROL_PDU = 1 << 20
_ABORT_SOURCES = {
    0: "the peer's application (service user)",
    1: "reserved",
    2: "the peer's DICOM stack (service provider)",
}


class AssociationError(Exception):
    """The association could not be made or has ended."""


class ConnectFailed(AssociationError):
    """No TCP (or TLS) connection: refused, unreachable or timed out."""


class Rejected(AssociationError):
    def __init__(self, result: int, source: int, reason: int, text: str) -> None:
        super().__init__(text)
        #: 1 permanent, 2 transient (PS3.8 9.3.4).
        self.result = result
        self.source = source
        self.reason = reason


class PeerAborted(AssociationError):
    def __init__(self, source: int, reason: int) -> None:
        super().__init__(
            f"the peer aborted the association (source: {_ABORT_SOURCES.get(source, source)}, reason {reason})"
        )
        #: 0: the peer's application decided (e.g. Orthanc refusing an unknown calling AE title).
        self.source = source


class Lost(AssociationError):
    """The connection closed, timed out, or the peer broke the protocol."""


@dataclass
class Accepted:
    """The negotiated presentation contexts: id -> (abstract syntax, transfer syntax)."""

    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: Refused ones: id -> (abstract syntax, result: 3 abstract syntax, 4 transfer syntaxes not supported).
    refused: dict[int, tuple[str, int]] = field(default_factory=dict)

    def find(self, abstract: str, transfer: str) -> int | None:
        for cx_id, (a, t) in self.contexts.items():
            if a == abstract and t == transfer:
                return cx_id
        return None


def dataset_offset(head: bytes, name: str) -> int:
    """Where a Part 10 file's data set starts (after the File Meta group), from its first 144 bytes."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{name} is not a DICOM file with a File Meta group")
    return 144 + int.from_bytes(head[140:144], "little")


class Association:
    """One association we requested; not thread-safe (one sender thread uses it)."""

    def __init__(self, sock: socket.socket, accepted: Accepted, peer_max_pdu: int, timeout: float) -> None:
        self.sock = sock
        self.accepted = accepted
        self.peer_max_pdu = peer_max_pdu
        self.timeout = timeout
        self.open = True
        self._message_id = 0
        self._buf = bytearray(1 << 16)
        # Data per P-DATA-TF: the PDU body is a PDV item (4-byte length, context id, header) plus data.
        self._fragment = (peer_max_pdu - 6) if peer_max_pdu else UNLIMITED_FRAGMENT

    # --- negotiation -----------------------------------------------------------

    @classmethod
    def request(
        cls,
        host: str,
        port: int,
        *,
        calling_ae: str,
        called_ae: str,
        contexts: list[tuple[str, list[str]]],
        timeout: float = 60.0,
        max_pdu: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> Association:
        """Connect and negotiate ``contexts`` ([(abstract syntax, [transfer syntaxes])]); at most 128."""
        if not contexts or len(contexts) > 128:
            raise ValueError(f"an association proposes 1 to 128 presentation contexts, not {len(contexts)}")
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {e}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                try:
                    sock = tls.wrap_socket(sock, server_hostname=host)
                except (ssl.SSLError, OSError) as e:
                    raise ConnectFailed(f"TLS handshake with {host}:{port} failed: {e}") from None
            prim = A_ASSOCIATE()
            prim.application_context_name = APPLICATION_CONTEXT
            prim.calling_ae_title = calling_ae
            prim.called_ae_title = called_ae
            proposed = []
            for n, (abstract, syntaxes) in enumerate(contexts):
                cx = PresentationContext()
                cx.context_id = 2 * n + 1
                cx.abstract_syntax = UID(abstract)
                cx.transfer_syntax = [UID(t) for t in syntaxes]
                proposed.append(cx)
            prim.presentation_context_definition_list = proposed
            ml = MaximumLengthNotification()
            ml.maximum_length_received = max_pdu if max_pdu else DEFAULT_MAX_PDU
            impl = ImplementationClassUIDNotification()
            impl.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
            ver = ImplementationVersionNameNotification()
            ver.implementation_version_name = IMPLEMENTATION_VERSION_NAME
            prim.user_information = [ml, impl, ver]
            rq = A_ASSOCIATE_RQ()
            rq.from_primitive(prim)
            _sendall(sock, rq.encode())
            try:
                pdu_type, body = _read_pdu(sock, MAX_CONTROL_PDU)
            except TimeoutError:
                raise Lost(f"no answer to the association request within {timeout:g} s") from None
            except OSError as e:  # reset, or a TLS alert (a refused client certificate) during negotiation
                raise Lost(f"the connection failed during association negotiation: {e}") from None
            raw = _PDU_HEAD.pack(pdu_type, len(body)) + body
            if pdu_type == 0x03:
                rj = A_ASSOCIATE_RJ()
                rj.decode(raw)
                raise Rejected(
                    rj.result,
                    rj.source,
                    rj.reason_diagnostic,
                    f"{'permanent' if rj.result == 1 else 'transient'}, {rj.source_str}: {rj.reason_str}",
                )
            if pdu_type == 0x07:
                raise PeerAborted(body[2] if len(body) > 2 else 0, body[3] if len(body) > 3 else 0)
            if pdu_type != 0x02:
                raise Lost(f"the peer answered the association request with PDU type 0x{pdu_type:02X}")
            ac = A_ASSOCIATE_AC()
            ac.decode(raw)
            ac_prim = ac.to_primitive()
            by_id = {int(cx.context_id): cx for cx in proposed}
            accepted = Accepted()
            for r in ac_prim.presentation_context_definition_results_list:
                cx_id = int(r.context_id)
                abstract = str(by_id[cx_id].abstract_syntax) if cx_id in by_id else ""
                if r.result == 0 and r.transfer_syntax:
                    accepted.contexts[cx_id] = (abstract, str(r.transfer_syntax[0]))
                else:
                    accepted.refused[cx_id] = (abstract, int(r.result or 0))
            peer_max = next(
                (
                    int(i.maximum_length_received or 0)
                    for i in ac_prim.user_information
                    if isinstance(i, MaximumLengthNotification)
                ),
                0,
            )
        except BaseException:
            _close(sock)
            raise
        assoc = cls(sock, accepted, peer_max, timeout)
        if not accepted.contexts:
            assoc.abort()
        return assoc

    # --- DIMSE -----------------------------------------------------------------

    def _next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _send_command(self, cx_id: int, command: bytes) -> None:
        pdv = _PDV_HEAD.pack(len(command) + 2, cx_id, 0x03)
        self._send(_PDU_HEAD.pack(0x04, len(command) + 6) + pdv + command)

    def _send_data(self, cx_id: int, data: bytes | memoryview, last: bool) -> None:
        header = _PDU_HEAD.pack(0x04, len(data) + 6) + _PDV_HEAD.pack(len(data) + 2, cx_id, 0x02 if last else 0x00)
        self._send(header, data)

    def _send(self, *parts: bytes | memoryview) -> None:
        try:
            if len(parts) == 1:
                self.sock.sendall(parts[0])
            elif isinstance(self.sock, ssl.SSLSocket):
                for p in parts:
                    self.sock.sendall(p)
            else:
                total = sum(len(p) for p in parts)
                sent = self.sock.sendmsg(parts)
                if sent < total:  # a partial write: send the rest plainly
                    rest = b"".join(bytes(p) for p in parts)[sent:]
                    self.sock.sendall(rest)
        except TimeoutError:
            self._dead()
            raise Lost(f"the peer did not take data for {self.timeout:g} s") from None
        except OSError as e:
            self._dead()
            raise Lost(f"the connection failed while sending: {e}") from None

    def _send_file(self, cx_id: int, f: BinaryIO, offset: int, name: str) -> None:
        """An open file's data set (from ``offset``), in PDU-sized fragments."""
        size = os.fstat(f.fileno()).st_size - offset
        if size <= 0:
            self._send_data(cx_id, b"", True)
            return
        chunk = min(self._fragment, 1 << 22)
        view = memoryview(bytearray(min(chunk, size)))
        left = size
        f.seek(offset)
        while left:
            n = f.readinto(view[: min(chunk, left)])  # type: ignore[attr-defined]
            if not n:
                raise OSError(f"{name} ended {left} bytes early")
            left -= n
            self._send_data(cx_id, view[:n], left == 0)

    def _send_bytes(self, cx_id: int, data: bytes) -> None:
        view = memoryview(data)
        if not data:
            self._send_data(cx_id, b"", True)
        for start in range(0, len(data), self._fragment):
            part = view[start : start + self._fragment]
            self._send_data(cx_id, part, start + len(part) >= len(data))

    def _response(self, message_id: int) -> dimse.Command:
        """Read PDUs until the response to ``message_id`` is complete; any data set is skipped."""
        command = bytearray()
        while True:
            pdu_type, body = self._read()
            if pdu_type == 0x04:
                pos = 0
                done = None
                while pos + 6 <= len(body):
                    length, _cx, header = _PDV_HEAD.unpack_from(body, pos)
                    data = body[pos + 6 : pos + 4 + length]
                    pos += 4 + length
                    if header & 0x01:
                        command += data
                        if header & 0x02:
                            done = dimse.decode_command(command)
                            command = bytearray()
                if done is not None:
                    if done.responding_to == message_id:
                        return done
                    log.debug("ignoring a response to message %d while waiting for %d", done.responding_to, message_id)
            elif pdu_type == 0x07:
                self._dead()
                raise PeerAborted(body[2] if len(body) > 2 else 0, body[3] if len(body) > 3 else 0)
            elif pdu_type == 0x05:  # the peer wants to release in the middle of our request
                try:
                    self.sock.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                finally:
                    self._dead()
                raise Lost("the peer released the association before answering")
            else:
                self.abort()
                raise Lost(f"unexpected PDU type 0x{pdu_type:02X} while waiting for a response")

    def _read(self) -> tuple[int, bytes]:
        try:
            return _read_pdu(self.sock, 64 << 20)
        except TimeoutError:
            self.abort()
            raise Lost(f"no answer within {self.timeout:g} s") from None
        except Lost:
            self._dead()
            raise
        except (OSError, EOFError) as e:
            self._dead()
            raise Lost(f"the connection closed: {e}") from None

    def store(
        self, cx_id: int, sop_class: str, sop_instance: str, *, path: Path | None = None, data: bytes | None = None
    ) -> dimse.Command:
        """C-STORE a file's data set (streamed from disk) or encoded bytes; returns the response command."""
        msg_id = self._next_id()
        command = dimse.encode_c_store_rq(msg_id, sop_class, sop_instance)
        if path is not None:
            # Opened (and its File Meta checked) before anything goes on the wire: one open per instance,
            # and a file that is not what the index says leaves the association usable.
            with open(path, "rb", buffering=0) as f:
                offset = dataset_offset(f.read(144), path.name)
                self._send_command(cx_id, command)
                self._send_file(cx_id, f, offset, path.name)
        else:
            self._send_command(cx_id, command)
            self._send_bytes(cx_id, data or b"")
        return self._response(msg_id)

    def echo(self, cx_id: int) -> dimse.Command:
        msg_id = self._next_id()
        self._send_command(cx_id, dimse.encode_c_echo_rq(msg_id))
        return self._response(msg_id)

    def n_action(self, cx_id: int, sop_class: str, sop_instance: str, action_type: int, data: bytes) -> dimse.Command:
        msg_id = self._next_id()
        self._send_command(cx_id, dimse.encode_n_action_rq(msg_id, sop_class, sop_instance, action_type))
        self._send_bytes(cx_id, data)
        return self._response(msg_id)

    # --- ending -------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (bounded) for A-RELEASE-RP; the connection is closed either way."""
        if not self.open:
            return
        try:
            self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            self.sock.settimeout(min(self.timeout, 10.0))
            while True:
                pdu_type, _ = _read_pdu(self.sock, MAX_CONTROL_PDU)
                if pdu_type in (0x06, 0x07):
                    break
        except (OSError, EOFError, Lost):
            pass  # the peer closed without A-RELEASE-RP: released all the same
        finally:
            self._dead()

    def abort(self) -> None:
        """A-ABORT (service user), then close."""
        if not self.open:
            return
        try:
            self.sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        except OSError:
            pass
        finally:
            self._dead()

    def _dead(self) -> None:
        self.open = False
        _close(self.sock)


def _sendall(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as e:
        raise Lost(f"the connection failed: {e}") from None


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("the peer closed the connection")
        got += k
    return bytes(buf)


def _read_pdu(sock: socket.socket, limit: int) -> tuple[int, bytes]:
    try:
        pdu_type, length = _PDU_HEAD.unpack(_read_exact(sock, 6))
        if length > limit:
            raise Lost(f"a PDU of {length} bytes (type 0x{pdu_type:02X}) is larger than allowed")
        return pdu_type, _read_exact(sock, length)
    except EOFError as e:
        raise Lost(str(e)) from None


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
