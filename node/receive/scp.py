"""The Storage and Verification SCP: pynetdicom wiring, access control and per-association logs."""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes
from pydicom._uid_dict import UID_dictionary
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Config
from node.receive import transport
from node.receive.ingest import Ingest, Peer
from node.receive.status import Status

log = logging.getLogger(__name__)


def storage_sop_classes() -> list[UID]:
    """Every Storage SOP Class pydicom knows, retired ones included (old modalities send them)."""
    out = []
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind == "SOP Class" and "Storage" in name and "Commitment" not in name:
            out.append(UID(uid))
    return sorted(set(out))


@dataclass
class _AssocStats:
    """Counted per association and logged once when it ends."""

    id: str
    calling_ae: str = ""
    address: str = ""
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0


class AccessPolicy:
    """Which calling AE titles (from which hosts) may associate."""

    def __init__(self, cfg: Config) -> None:
        self.peers: dict[str, list[Any]] = {}
        for p in cfg.access.allowed_peers:
            nets = [ipaddress.ip_network(h, strict=False) for h in p.hosts]
            self.peers.setdefault(p.ae_title, []).extend(nets or [None])

    @property
    def open(self) -> bool:
        return not self.peers

    def allows(self, calling_ae: str, address: str) -> str | None:
        """``None`` if allowed, else the reason for the rejection."""
        if self.open:
            return None
        nets = self.peers.get(calling_ae.strip())
        if nets is None:
            return f"calling AE title {calling_ae.strip()!r} is not in access.allowed_peers"
        if None in nets:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"peer address {address!r} is not an IP address"
        if any(ip in n for n in nets):
            return None
        return f"calling AE title {calling_ae.strip()!r} is not allowed from {address}"


class StorageSCP:
    """Owns the pynetdicom AE and its listening server."""

    def __init__(self, cfg: Config, ingest: Ingest) -> None:
        self.cfg = cfg
        self.ingest = ingest
        self.access = AccessPolicy(cfg)
        self._server: ThreadedAssociationServer | None = None
        self._stats_lock = threading.Lock()
        self.totals = {"stored": 0, "duplicates": 0, "failed": 0, "associations": 0}
        transport.install()
        transport.set_receive_dir(ingest.storage.tmp)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        n = self.cfg.node
        ae = AE(ae_title=n.ae_title)
        ae.maximum_pdu_size = n.max_pdu
        ae.maximum_associations = n.max_associations
        ae.acse_timeout = n.acse_timeout
        ae.dimse_timeout = n.dimse_timeout
        ae.network_timeout = n.network_timeout
        ae.require_called_aet = self.cfg.access.check_called_ae
        syntaxes = list(AllTransferSyntaxes)
        ae.add_supported_context(Verification, syntaxes)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, syntaxes)
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        t = self.cfg.tls
        if not t.enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(t.certificate), str(t.private_key))
        if t.client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(t.client_ca))
        return ctx

    # --- events -------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else ""
        address = assoc.requestor.address
        stats = _AssocStats(id=uuid.uuid4().hex[:12], calling_ae=str(calling).strip(), address=address)
        assoc._node_stats = stats  # type: ignore[attr-defined]
        reason = self.access.allows(str(calling), address)
        if reason is not None:
            log.warning("rejected association from %s (%s): %s", stats.calling_ae, address, reason)
            # Permanent, service-user, calling AE title not recognised (PS3.8 9.3.4).
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            return
        log.info("association %s from %s (%s:%s)", stats.id, stats.calling_ae, address, assoc.requestor.port)

    def _on_rejected(self, event: evt.Event) -> None:
        primitive = event.assoc.requestor.primitive
        called = primitive.called_ae_title.strip() if primitive else "?"
        if called != self.cfg.node.ae_title:
            log.warning("rejected association: called AE title %r is not ours (%r)", called, self.cfg.node.ae_title)

    def _on_accepted(self, event: evt.Event) -> None:
        with self._stats_lock:
            self.totals["associations"] += 1
        rejected = getattr(event.assoc, "_rejected_cx", [])
        for cx in rejected:
            log.warning(
                "association %s: refused presentation context %s (%s) with %s",
                _stats(event).id, cx.abstract_syntax, getattr(cx.abstract_syntax, "name", ""),
                ", ".join(str(t) for t in cx.transfer_syntax),
            )  # fmt: skip

    def _on_end(self, event: evt.Event) -> None:
        s = getattr(event.assoc, "_node_stats", None)
        # A data set that was still arriving when the connection died.
        msg = getattr(event.assoc.dimse, "message", None)
        partial = getattr(msg, "_data_set_file", None) if msg is not None else None
        if isinstance(partial, transport.ReceivedFile):
            partial.discard()
        if s is None or getattr(event.assoc, "_node_logged", False):
            return
        event.assoc._node_logged = True  # type: ignore[attr-defined]
        how = "aborted" if event.event is evt.EVT_ABORTED else "released" if event.event is evt.EVT_RELEASED else "closed"
        dt = time.monotonic() - s.started
        log.info(
            "association %s from %s %s after %.1f s: %d stored, %d duplicate, %d refused, %.1f MB",
            s.id, s.calling_ae, how, dt, s.stored, s.duplicates, s.failed, s.bytes / 1e6,
        )  # fmt: skip

    def _on_echo(self, event: evt.Event) -> int:
        return Status.SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset:
        req = event.request
        rx = req._dataset_file
        stats = _stats(event)
        _cx_id, _abstract, ts = event.context
        peer = Peer(
            calling_ae=stats.calling_ae,
            called_ae=self.cfg.node.ae_title,
            address=stats.address,
            association_id=stats.id,
        )
        if not isinstance(rx, transport.ReceivedFile):  # cannot happen with the fast path installed
            status, reason = Status.OUT_OF_RESOURCES, "data set was not streamed to disk"
            outcome = ""
        else:
            size = rx.size
            r = self.ingest.store(
                rx,
                sop_class_uid=str(req.AffectedSOPClassUID),
                sop_instance_uid=str(req.AffectedSOPInstanceUID),
                transfer_syntax=UID(ts),
                peer=peer,
            )
            status, reason, outcome = r.status, r.reason, r.outcome
        rsp = Dataset()
        rsp.Status = int(status)
        with self._stats_lock:
            if status == Status.SUCCESS:
                if outcome == "duplicate":
                    stats.duplicates += 1
                    self.totals["duplicates"] += 1
                else:
                    stats.stored += 1
                    stats.bytes += size
                    self.totals["stored"] += 1
            else:
                stats.failed += 1
                self.totals["failed"] += 1
                rsp.ErrorComment = reason[:64]
        return rsp

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        n = self.cfg.node
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server(
            (n.host, n.port), block=False, evt_handlers=handlers, ssl_context=self._ssl_context()
        )
        if self.access.open:
            log.warning("access.allowed_peers is empty: any calling AE title may store to this node")
        log.info(
            "listening as %s on %s:%d (TLS %s, max PDU %s, max %d associations)",
            n.ae_title, n.host, self.port, "on" if self.cfg.tls.enabled else "off",
            n.max_pdu or "unlimited", n.max_associations,
        )  # fmt: skip

    @property
    def port(self) -> int:
        if self._server is None:
            return self.cfg.node.port
        return int(self._server.server_address[1])

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, then let in-flight associations finish (bounded), then close."""
        if self._server is None:
            return
        server = self._server
        server.shutdown()  # stops accepting and closes the listening socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.active_associations:
            time.sleep(0.05)
        for assoc in server.active_associations:
            log.warning("association %s still open after %.0f s at shutdown: aborting it", _stats_of(assoc), timeout)
            assoc.abort()
        self._server = None


def _stats_of(assoc: Any) -> str:
    s = getattr(assoc, "_node_stats", None)
    return s.id if s else "?"


def _stats(event: evt.Event) -> _AssocStats:
    s = getattr(event.assoc, "_node_stats", None)
    if s is None:
        s = _AssocStats(id=uuid.uuid4().hex[:12], calling_ae=str(event.assoc.requestor.ae_title).strip(),
                        address=event.assoc.requestor.address)  # fmt: skip
        event.assoc._node_stats = s  # type: ignore[attr-defined]
    return s
