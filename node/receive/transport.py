"""Event-driven replacements for pynetdicom 3.0's polling loops, and streamed reception.

Why this module exists: pynetdicom moves every DIMSE message between two
threads that poll. The association thread sleeps 1 ms on *every* loop, and
the DUL thread sleeps 1 ms whenever a loop found nothing to do, so each
C-STORE pays one or two millisecond naps before its response leaves, and a
single stream of small instances cannot exceed a few hundred per second
however fast the handler is. Socket reads are also done 4 KiB at a time.

What we change (and only that; the state machine, PDU codecs and DIMSE
logic stay pynetdicom's):

* the DUL reactor waits in ``select`` on the socket *and* a wake-up pipe that
  :meth:`send_pdu` writes to, so it reacts at once to incoming data and to
  outgoing primitives and sleeps otherwise;
* the acceptor's association reactor blocks on the DIMSE message queue
  instead of sleeping;
* socket reads use ``recv_into`` into one buffer per PDU;
* accepted sockets get ``TCP_NODELAY`` so small responses are not held back
  by Nagle's algorithm waiting for the peer's delayed ACK;
* C-STORE data sets are streamed into a file in the node's own temporary
  directory (on the storage filesystem, so the final rename is atomic),
  hashing as they arrive, so an instance of any size costs a bounded amount
  of memory and is never copied again.

The versions pinned in ``pyproject.toml`` are the ones this was written and
tested against; :func:`install` refuses other major/minor versions loudly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import select
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom.uid import UID
from pynetdicom import acse as _acse
from pynetdicom import association as _association
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom import transport as _transport
from pynetdicom.dsutils import create_file_meta as _create_file_meta
from pynetdicom.pdu import A_ABORT_RQ

from node import __version__

log = logging.getLogger(__name__)

#: Our implementation identity in the File Meta of every stored file (PS3.7 D.3.3.2).
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.10.1431.1.0")
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]

#: How long an idle reactor waits before re-checking its timers (seconds).
IDLE_WAIT = 0.05
#: How long the association thread waits for a message before checking
#: release/abort/timeouts. A release request is seen within this time.
ASSOC_POLL = 0.005

SUPPORTED_PYNETDICOM = ("3.0",)

_installed = False
_rx_dir: Path | None = None
_install_lock = threading.Lock()


class ReceivedFile:
    """A file the data set of one C-STORE request is streamed into.

    pynetdicom writes the preamble, its File Meta and then each P-DATA
    fragment. We hash as we go, so no second pass over the bytes is needed.
    It quacks like the ``NamedTemporaryFile`` pynetdicom expects.
    """

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=".part", dir=directory)
        self.fd: int | None = fd
        self.name = name
        self.size = 0
        self._sha = hashlib.sha256()
        self.file = self  # pynetdicom calls ``.file.flush()``

    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self.fd is not None, "write to a closed ReceivedFile"
        view = memoryview(data)
        total = len(view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._sha.update(data)
        self.size += total
        return total

    def flush(self) -> None:
        """Data goes straight to the kernel; durability is :meth:`sync`'s job."""

    def sync(self) -> None:
        if self.fd is not None:
            os.fdatasync(self.fd)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Close and remove the file; used on every failure path."""
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass


def _received_file_factory(*_args: Any, **_kwargs: Any) -> ReceivedFile:
    if _rx_dir is None:
        raise RuntimeError("node.receive.transport.set_receive_dir() was not called")
    return ReceivedFile(_rx_dir)


def _file_meta(**kwargs: Any) -> Any:
    kwargs.setdefault("implementation_uid", IMPLEMENTATION_CLASS_UID)
    kwargs.setdefault("implementation_version", IMPLEMENTATION_VERSION_NAME)
    return _create_file_meta(**kwargs)


def set_receive_dir(path: Path) -> None:
    """Stream received data sets into ``path`` (must be on the storage filesystem)."""
    global _rx_dir
    path.mkdir(parents=True, exist_ok=True)
    _rx_dir = path


# --- socket ---------------------------------------------------------------


def _recv(self: _transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """Read exactly ``nr_bytes`` (or fewer if the peer closed) into one buffer."""
    sock = self.socket
    assert sock is not None
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            del buf[got:]
            return buf
        got += n
    return buf


def _get_request(self: _transport.AssociationServer) -> tuple[socket.socket, tuple[str, int]]:
    sock = self.socket
    assert sock is not None
    client, address = sock.accept()
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (e.g. a socketpair in tests)
        pass
    if self.ssl_context:
        client = self.ssl_context.wrap_socket(client, server_side=True)
    return client, address


# --- DUL reactor ------------------------------------------------------------


def _send_pdu(self: _dul.DULServiceProvider, primitive: Any) -> None:
    _orig_send_pdu(self, primitive)
    wake_w = getattr(self, "_node_wake_w", None)
    if wake_w is not None:
        try:
            os.write(wake_w, b"\0")
        except OSError:  # pipe full (reactor will drain it) or closed at shutdown
            pass


def _wait_for_work(self: _dul.DULServiceProvider, wake_r: int) -> None:
    """Sleep until the socket is readable, a primitive is queued, or IDLE_WAIT passes."""
    if self.to_provider_queue.queue:
        return
    assoc_sock = self.socket
    raw = getattr(assoc_sock, "socket", None) if assoc_sock is not None else None
    if raw is None or not getattr(assoc_sock, "_is_connected", False):
        # Not connected yet (requestor setting up): only the queue matters.
        select.select([wake_r], [], [], 0.001)
    else:
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        try:
            readable, _, _ = select.select([raw, wake_r], [], [], IDLE_WAIT)
        except (OSError, ValueError):
            return  # socket closed: the next loop's ready check raises Evt17
    try:
        while True:
            if len(os.read(wake_r, 4096)) < 4096:
                break
    except BlockingIOError:
        pass


def _run_reactor(self: _dul.DULServiceProvider) -> None:
    """pynetdicom's DUL loop, waiting on events instead of sleeping."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    self._node_wake_w = wake_w  # type: ignore[attr-defined]
    self._idle_timer.start()
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # mirrors pynetdicom: abort on any DUL failure
                log.error("DUL failure, aborting association: %s", exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                try:
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                except Exception:
                    pass
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                _wait_for_work(self, wake_r)
                continue
            self.state_machine.do_action(event)
    finally:
        self._node_wake_w = None  # type: ignore[attr-defined]
        os.close(wake_w)
        os.close(wake_r)


# --- association reactor ------------------------------------------------------


def _assoc_run_reactor(self: _association.Association) -> None:
    """pynetdicom's acceptor loop, blocking on the DIMSE queue instead of sleeping."""
    self._is_paused = False
    msg_queue = self.dimse.msg_queue
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        try:
            context_id, msg = msg_queue.get(timeout=ASSOC_POLL)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
            if msg_queue.qsize():
                continue  # serve queued messages before the housekeeping below

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.debug("association released by the peer")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            log.error("network timeout reached, aborting association")
            self.abort()
            self.kill()
            return


def _assoc_kill(self: _association.Association) -> None:
    self._reactor_checkpoint.set()
    self._kill = True
    self.is_established = False
    self._is_paused = True
    while self.dul.is_alive() and not self.dul.stop_dul():
        time.sleep(0.001)


_orig_send_pdu = _dul.DULServiceProvider.send_pdu
_orig_negotiate = _acse.negotiate_as_acceptor


def _negotiate_as_acceptor(rq_contexts: Any, ac_contexts: Any, roles: Any = None) -> Any:
    """Accept the transfer syntax the *requestor* prefers, not the first in our list.

    pynetdicom walks the acceptor's list, so an SCP that supports everything
    would pick Implicit VR Little Endian for a JPEG 2000 file and make the
    sender decompress it, or pick a lossy syntax the sender only offered as
    an alternative. PS3.8 leaves the choice to the acceptor; a store-as-sent
    node should take the sender's first choice that it supports.
    """
    result, ac_roles = _orig_negotiate(rq_contexts, ac_contexts, roles)
    supported = {cx.abstract_syntax: set(cx.transfer_syntax) for cx in ac_contexts}
    proposed = {cx.context_id: cx.transfer_syntax for cx in rq_contexts}
    for cx in result:
        if cx.result != 0x00:
            continue
        ours = supported.get(cx.abstract_syntax, set())
        for ts in proposed.get(cx.context_id, []):
            if ts in ours:
                cx.transfer_syntax = [ts]
                break
    return result, ac_roles


def install() -> None:
    """Apply the replacements once per process."""
    global _installed
    with _install_lock:
        if _installed:
            return
        major_minor = ".".join(pynetdicom.__version__.split(".")[:2])
        if major_minor not in SUPPORTED_PYNETDICOM:
            raise RuntimeError(
                f"dicom-node's receive fast path was written for pynetdicom {SUPPORTED_PYNETDICOM}, "
                f"found {pynetdicom.__version__}; install a supported version"
            )
        _transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
        _transport.AssociationServer.get_request = _get_request  # type: ignore[method-assign]
        _dul.DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
        _dul.DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
        _association.Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
        _association.Association.kill = _assoc_kill  # type: ignore[method-assign]
        _acse.negotiate_as_acceptor = _negotiate_as_acceptor  # type: ignore[attr-defined]
        _dimse_messages.NamedTemporaryFile = _received_file_factory  # type: ignore[attr-defined]
        _dimse_messages.create_file_meta = _file_meta  # type: ignore[attr-defined]
        # Stream every C-STORE data set to disk instead of memory.
        pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
        _installed = True
