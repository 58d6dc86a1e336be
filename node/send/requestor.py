"""The requestor: an association written directly on the socket, the SCU's fast path.

pynetdicom's association runs two threads that hand every PDU and DIMSE
message through queues and builds a pydicom Dataset for every command set;
for a stream of C-STOREs that cost ~2 ms per instance, more than a PACS
takes to store one. Here the sending thread does everything itself: it
writes the command set (:mod:`node.dicom.dimse`), streams the data set from
the file in PDU-sized fragments, and reads the response off the same socket.
PDUs and negotiation are :mod:`node.dicom`'s.

Errors say what happened, because the caller decides from them whether to
try again: :class:`ConnectFailed` (no TCP connection), :class:`Rejected`
(A-ASSOCIATE-RJ, with its result, source and reason), :class:`PeerAborted`
(A-ABORT, and whether the peer's application or its provider sent it) and
:class:`Lost` (the connection closed or went silent).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from node.dicom import association, dimse, pdu
from node.dicom.association import Accepted
from node.dicom.dimse import dataset_offset
from node.dicom.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.dicom.pdu import MAX_CONTROL_PDU, AbortSource, PduReader, PduType, Pdv, PeerClosed

__all__ = ["Accepted", "Association", "AssociationError", "ConnectFailed", "Lost", "PeerAborted", "Rejected"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Data set fragments when the peer accepts PDUs of any size.
UNLIMITED_FRAGMENT = 1 << 20
#: Largest PDU read from the peer (its responses are command sets: a few hundred bytes).
MAX_RESPONSE_PDU = 64 << 20
#: Plain ints: an IntFlag operand would make each ``&`` a Python-level call.
_COMMAND, _LAST, _DATA = int(Pdv.COMMAND), int(Pdv.LAST), int(Pdv.DATA)


class AssociationError(Exception):
    """The association could not be made or has ended."""


class ConnectFailed(AssociationError):
    """No TCP (or TLS) connection: refused, unreachable or timed out."""


class Rejected(AssociationError):
    def __init__(self, rejection: pdu.Rejection) -> None:
        super().__init__(rejection.text)
        #: 1 permanent, 2 transient (PS3.8 9.3.4).
        self.result = rejection.result
        self.source = rejection.source
        self.reason = rejection.reason


class PeerAborted(AssociationError):
    def __init__(self, source: int, reason: int) -> None:
        super().__init__(
            f"the peer aborted the association (source: {pdu.ABORT_SOURCE_TEXT.get(source, str(source))}, reason {reason})"
        )
        #: 0: the peer's application decided (e.g. Orthanc refusing an unknown calling AE title).
        self.source = source


class Lost(AssociationError):
    """The connection closed, timed out, or the peer broke the protocol."""


class Association:
    """One association we requested; not thread-safe (one sender thread uses it)."""

    def __init__(self, sock: socket.socket, reader: PduReader, accepted: Accepted, timeout: float) -> None:
        self.sock = sock
        self.reader = reader
        self.accepted = accepted
        self.peer_max_pdu = peer_max_pdu = accepted.peer_max_pdu
        self.timeout = timeout
        self.open = True
        self._message_id = 0
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
        rq = association.build_request(
            calling_ae,
            called_ae,
            contexts,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            max_pdu=max_pdu,
        )
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
            _sendall(sock, rq.encode())
            reader = PduReader(sock, 1 << 16)
            try:
                pdu_type, body = reader.read_pdu(MAX_CONTROL_PDU)
            except PeerClosed as e:
                if e.timed_out:
                    raise Lost(f"no answer to the association request within {timeout:g} s") from None
                # reset, or a TLS alert (a refused client certificate) during negotiation
                raise Lost(f"the connection failed during association negotiation: {e}") from None
            except pdu.PduError as e:
                raise Lost(str(e)) from None
            if pdu_type == PduType.A_ASSOCIATE_RJ:
                raise Rejected(_decoded(pdu.decode_a_associate_rj, body))
            if pdu_type == PduType.A_ABORT:
                raise PeerAborted(*pdu.decode_a_abort(body))
            if pdu_type != PduType.A_ASSOCIATE_AC:
                raise Lost(f"the peer answered the association request with PDU type 0x{pdu_type:02X}")
            accepted = association.read_accept(rq, _decoded(pdu.AssociateAC.decode, body))
        except BaseException:
            _close(sock)
            raise
        assoc = cls(sock, reader, accepted, timeout)
        if not accepted.contexts:
            assoc.abort()
        return assoc

    # --- DIMSE -----------------------------------------------------------------

    def _next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _send_command(self, cx_id: int, command: bytes) -> None:
        self._send(pdu.p_data(cx_id, command))

    def _send_data(self, cx_id: int, data: bytes | memoryview, last: bool) -> None:
        self._send(pdu.p_data_header(cx_id, len(data), _LAST if last else _DATA), data)

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

    def _send_file(self, cx_id: int, f: io.RawIOBase, offset: int, name: str) -> None:
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
            n = f.readinto(view[: min(chunk, left)])
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
            if pdu_type == PduType.P_DATA_TF:
                done = None
                try:
                    for _cx, header, data in pdu.iter_pdvs(body):
                        if header & _COMMAND:
                            command += data
                            if header & _LAST:
                                done = dimse.decode_command(command)
                                command = bytearray()
                except (pdu.PduError, dimse.CommandError) as e:
                    self.abort()
                    raise Lost(f"the peer broke the protocol: {e}") from None
                if done is not None:
                    if done.responding_to == message_id:
                        return done
                    log.debug("ignoring a response to message %d while waiting for %d", done.responding_to, message_id)
            elif pdu_type == PduType.A_ABORT:
                self._dead()
                raise PeerAborted(*pdu.decode_a_abort(body))
            elif pdu_type == PduType.A_RELEASE_RQ:  # the peer wants to release in the middle of our request
                try:
                    self.sock.sendall(pdu.A_RELEASE_RP)
                finally:
                    self._dead()
                raise Lost("the peer released the association before answering")
            else:
                self.abort()
                raise Lost(f"unexpected PDU type 0x{pdu_type:02X} while waiting for a response")

    def _read(self) -> tuple[int, bytes]:
        try:
            return self.reader.read_pdu(MAX_RESPONSE_PDU)
        except PeerClosed as e:
            if e.timed_out:
                self.abort()
                raise Lost(f"no answer within {self.timeout:g} s") from None
            self._dead()
            raise Lost(f"the connection closed: {e}") from None
        except pdu.PduError as e:
            self._dead()
            raise Lost(str(e)) from None

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
            self.sock.sendall(pdu.A_RELEASE_RQ)
            self.sock.settimeout(min(self.timeout, 10.0))
            while True:
                pdu_type, _ = self.reader.read_pdu(MAX_RESPONSE_PDU)
                if pdu_type in (PduType.A_RELEASE_RP, PduType.A_ABORT):
                    break
        except (OSError, PeerClosed, pdu.PduError):
            pass  # the peer closed without A-RELEASE-RP: released all the same
        finally:
            self._dead()

    def abort(self) -> None:
        """A-ABORT (service user), then close."""
        if not self.open:
            return
        try:
            self.sock.sendall(pdu.a_abort(AbortSource.SERVICE_USER))
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


def _decoded(decode: Callable[[bytes], T], body: bytes) -> T:
    try:
        return decode(body)
    except pdu.PduError as e:
        raise Lost(f"the peer's answer to the association request is malformed: {e}") from None


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
