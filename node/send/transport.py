"""Event-driven replacements for pynetdicom 3.0's polling loops, for our SCU.

The node's SCP has its own acceptor (:mod:`node.receive.ul`); the SCU side
(``dicom-node send``, forwarding) still uses pynetdicom associations, whose
DUL thread sleeps 1 ms whenever a loop found nothing to do and reads sockets
4 KiB at a time, and whose sockets leave Nagle's algorithm on, so a small
C-STORE-RQ can wait ~40 ms for the peer's delayed ACK.

What we change (and only that; the state machine, PDU codecs and DIMSE
logic stay pynetdicom's):

* the DUL reactor waits in ``select`` on the socket *and* a wake-up pipe that
  :meth:`send_pdu` writes to, so it reacts at once to incoming data and to
  outgoing primitives and sleeps otherwise;
* socket reads use ``recv_into`` into one buffer per PDU;
* requestor sockets get ``TCP_NODELAY``;
* a requestor association's own loop no longer takes DIMSE messages (it
  raced with ``send_c_store`` for the responses; see :func:`_assoc_reactor`).

The versions pinned in ``pyproject.toml`` are the ones this was written and
tested against; :func:`install` refuses other major/minor versions loudly.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from typing import Any

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import evt as _evt
from pynetdicom import transport as _transport
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)

#: How long an idle reactor waits before re-checking its timers (seconds).
IDLE_WAIT = 0.05

SUPPORTED_PYNETDICOM = ("3.0",)

_installed = False
_install_lock = threading.Lock()


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


def _create_socket(self: _transport.AssociationSocket, address: Any) -> socket.socket:
    sock = _orig_create_socket(self, address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


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


# --- the association's own loop, for requestors --------------------------------


def _assoc_reactor(self: _association.Association) -> None:
    """pynetdicom's association loop, minus serving requests when we are the requestor.

    pynetdicom's loop takes any complete DIMSE message off the queue to serve
    it as a request; ``send_c_store`` pauses the loop first, but the pause has a
    window in which the loop takes the C-STORE *response* the sender waits for
    ("Received unexpected C-STORE service message"), and the send then waits
    out its DIMSE timeout. Our SCU associations never act as an SCP, so for
    them the loop only watches for release, abort, the DUL thread and the
    network timeout, and leaves every message to the send_* call waiting for it.
    """
    if not self.is_requestor:
        _orig_assoc_reactor(self)
        return
    # It never takes a message, so as far as send_* is concerned it is always paused.
    self._is_paused = True
    while not self._kill:
        time.sleep(0.005)
        if self.is_established and self.acse.is_release_requested():
            self._reactor_checkpoint.wait()  # never in the middle of a send_*
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            _evt.trigger(self, _evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            _evt.trigger(self, _evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            log.error("network timeout reached on an association to %s", self.acceptor.ae_title)
            self.abort()
            self.kill()
            return


_orig_assoc_reactor = _association.Association._run_reactor
_orig_send_pdu = _dul.DULServiceProvider.send_pdu
_orig_create_socket = _transport.AssociationSocket._create_socket


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
        _transport.AssociationSocket._create_socket = _create_socket  # type: ignore[method-assign]
        _dul.DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
        _dul.DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
        _association.Association._run_reactor = _assoc_reactor  # type: ignore[method-assign]
        _installed = True
