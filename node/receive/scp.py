"""The node's SCP (Storage, Verification and, with a service, Query/Retrieve): what is accepted, from
whom, and what each association did."""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node import audit, metrics
from node.config import Config
from node.dicom import dimse, pdu
from node.dicom.dimse import VERIFICATION
from node.dicom.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.dicom.status import Status, is_stored, lookup
from node.receive.acceptor import Acceptor, AcceptorSettings, AssociationInfo, QRService, StoreRequest
from node.receive.ingest import Ingest, Peer
from node.receive.sop_classes import QR_CLASSES, storage_classes

log = logging.getLogger(__name__)


def accepted_transfer_syntaxes() -> frozenset[str]:
    """Every transfer syntax pydicom 3 can read; data sets are stored as sent, never transcoded."""
    return frozenset(str(ts) for ts in AllTransferSyntaxes)


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


STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


def _failure_reason(code: int) -> str:
    """Storage Commitment's Failure Reason (0008,1197) uses the status codes (PS3.4 J.3.3)."""
    return f"the PACS did not commit it: failure reason 0x{code:04X} ({lookup(code).name})"


class StorageSCP:
    """Owns the listening acceptor and answers for the node."""

    def __init__(
        self,
        cfg: Config,
        ingest: Ingest,
        on_commitment: Callable[[str, list[str], dict[str, str]], None] | None = None,
        qr: QRService | None = None,
    ) -> None:
        """``on_commitment(transaction UID, committed SOP Instance UIDs, {failed UID: reason})``: a
        Storage Commitment result arrived (a PACS sends it on an association of its own). ``qr``: the
        Query/Retrieve service; with it the Patient and Study Root FIND, MOVE and GET classes are accepted
        (Explicit or Implicit VR Little Endian, Deflated Explicit VR Little Endian) and a C-GET requestor may take the SCP role for storage."""
        self.cfg = cfg
        self.ingest = ingest
        self.on_commitment = on_commitment
        self.access = AccessPolicy(cfg)
        self._lock = threading.Lock()
        self.totals = {"stored": 0, "duplicates": 0, "failed": 0, "associations": 0}
        n = cfg.node
        syntaxes = accepted_transfer_syntaxes()
        supported = {uid: syntaxes for uid in storage_classes()}
        supported[VERIFICATION] = syntaxes
        little_endian = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        if on_commitment is not None:
            supported[STORAGE_COMMITMENT] = little_endian
        if qr is not None:
            supported.update(dict.fromkeys(QR_CLASSES, little_endian | {DeflatedExplicitVRLittleEndian}))
        settings = AcceptorSettings(
            ae_title=n.ae_title,
            max_pdu=n.max_pdu,
            max_associations=n.max_associations,
            acse_timeout=n.acse_timeout,
            network_timeout=n.network_timeout,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version=IMPLEMENTATION_VERSION_NAME,
            supported=supported,
            unknown_storage=syntaxes if n.accept_unknown_sop_classes else frozenset(),
            max_pending=n.max_pending_connections,
            max_pending_per_address=n.max_pending_per_address,
            receive_dir=ingest.storage.tmp,
            ssl_context=self._ssl_context(),
            scp_role_classes=frozenset({STORAGE_COMMITMENT}) if on_commitment is not None else frozenset(),
            reuse_port=n.processes > 1,
        )
        self.acceptor = Acceptor(settings, self, n.host, n.port, qr)

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

    # --- Handlers protocol ----------------------------------------------------

    def check_association(self, calling_ae: str, called_ae: str, address: str) -> pdu.Rejection | None:
        who = {"calling_ae": calling_ae, "called_ae": called_ae, "peer_address": address}
        if self.cfg.access.check_called_ae and called_ae != self.cfg.node.ae_title:
            reason = f"called AE title {called_ae!r} is not ours ({self.cfg.node.ae_title!r})"
            log.warning("rejected association from %s (%s): %s", calling_ae, address, reason, extra=who)
            self._rejected(calling_ae, called_ae, address, "called-ae", reason)
            return pdu.CALLED_AE_NOT_RECOGNIZED
        refused = self.access.allows(calling_ae, address)
        if refused is not None:
            log.warning("rejected association from %s (%s): %s", calling_ae, address, refused, extra=who)
            key = "calling-ae" if calling_ae.strip() not in self.access.peers else "peer-address"
            self._rejected(calling_ae, called_ae, address, key, refused)
            return pdu.CALLING_AE_NOT_RECOGNIZED
        with self._lock:
            self.totals["associations"] += 1
        return None

    def _rejected(self, calling_ae: str, called_ae: str, address: str, key: str, text: str) -> None:
        metrics.ASSOCIATIONS_REJECTED.labels(key).inc()
        audit.submit(
            self.ingest.writer,
            "association_rejected",
            actor=calling_ae,
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer_address=address,
            detail=text,
        )

    def association_rejected(self, assoc: AssociationInfo, reason: str, text: str) -> None:
        self._rejected(assoc.calling_ae, assoc.called_ae, assoc.address, reason, text)

    def association_accepted(self, assoc: AssociationInfo) -> None:
        metrics.ASSOCIATIONS_ACCEPTED.inc()
        audit.submit(
            self.ingest.writer,
            "association_accepted",
            actor=assoc.calling_ae,
            calling_ae=assoc.calling_ae,
            called_ae=assoc.called_ae,
            peer_address=assoc.address,
            detail=f"association {assoc.id} from port {assoc.port}, {len(assoc.contexts)} presentation "
            "context(s) accepted",
        )

    def store(self, assoc: AssociationInfo, request: StoreRequest) -> tuple[int, str]:
        rx = request.file
        size = rx.size - rx.dataset_offset
        result = self.ingest.store(
            rx,
            sop_class_uid=request.command.affected_sop_class_uid,
            sop_instance_uid=request.command.affected_sop_instance_uid,
            transfer_syntax=UID(request.transfer_syntax),
            peer=Peer(assoc.calling_ae, assoc.called_ae, assoc.address, assoc.id),
        )
        with self._lock:
            if is_stored(result.status):
                if result.outcome == "duplicate":
                    assoc.duplicates += 1
                    self.totals["duplicates"] += 1
                else:
                    assoc.stored += 1
                    assoc.bytes += size
                    self.totals["stored"] += 1
            else:
                assoc.failed += 1
                self.totals["failed"] += 1
        if is_stored(result.status):
            if result.outcome == "duplicate":
                metrics.DUPLICATES_RECEIVED.inc()
            else:
                metrics.INSTANCES_RECEIVED.inc()
                metrics.BYTES_RECEIVED.inc(size)
        return int(result.status), result.reason

    def association_ended(self, assoc: AssociationInfo, how: str) -> None:
        log.info(
            "association %s from %s %s after %.1f s: %d stored, %d duplicate, %d refused, %.1f MB",
            assoc.id,
            assoc.calling_ae,
            how,
            time.monotonic() - assoc.started,
            assoc.stored,
            assoc.duplicates,
            assoc.failed,
            assoc.bytes / 1e6,
            extra={"association_id": assoc.id, "calling_ae": assoc.calling_ae, "peer_address": assoc.address},
        )

    def event_report(self, assoc: AssociationInfo, command: dimse.Command, transfer_syntax: str, data: bytes) -> int:
        if command.affected_sop_class_uid != STORAGE_COMMITMENT or self.on_commitment is None:
            log.warning(
                "association %s from %s: N-EVENT-REPORT for %s refused (only Storage Commitment results are taken)",
                assoc.id,
                assoc.calling_ae,
                command.affected_sop_class_uid,
            )
            return Status.SOP_CLASS_NOT_SUPPORTED
        if command.event_type_id not in (1, 2):
            return Status.NO_SUCH_EVENT_TYPE
        try:
            ts = UID(transfer_syntax)
            ds = read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
            transaction = str(ds.TransactionUID)
            committed = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]
            failed = {
                str(i.ReferencedSOPInstanceUID): _failure_reason(int(i.get("FailureReason", Status.PROCESSING_FAILURE)))
                for i in ds.get("FailedSOPSequence", [])
            }
        except Exception as e:
            log.error("association %s from %s: unreadable storage commitment result: %s", assoc.id, assoc.calling_ae, e)
            return Status.PROCESSING_FAILURE
        log.info(
            "association %s from %s: storage commitment result for transaction %s: %d committed, %d failed",
            assoc.id,
            assoc.calling_ae,
            transaction,
            len(committed),
            len(failed),
        )
        try:
            self.on_commitment(transaction, committed, failed)
        except Exception:
            log.exception("could not record the storage commitment result of transaction %s", transaction)
            return Status.PROCESSING_FAILURE
        return Status.SUCCESS

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        n = self.cfg.node
        self.acceptor.start()
        if self.access.open:
            log.warning("access.allowed_peers is empty: any calling AE title may store to this node")
        log.info(
            "listening as %s on %s:%d (TLS %s, max PDU %s, max %d associations)",
            n.ae_title,
            n.host,
            self.port,
            "on" if self.cfg.tls.enabled else "off",
            n.max_pdu or "unlimited",
            n.max_associations,
        )

    @property
    def port(self) -> int:
        return self.acceptor.port

    @property
    def listening(self) -> bool:
        return self.acceptor.listening

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop accepting, let in-flight associations finish (bounded), then abort the rest.

        Returns ``True`` if no association had to be aborted.
        """
        return self.acceptor.stop(timeout)
