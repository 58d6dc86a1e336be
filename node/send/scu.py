"""The C-STORE SCU: one sender for forwarding and ``dicom-node send``.

A :class:`Sender` holds one association to one peer and sends instances over
it one after another, reusing it while there is more to send and opening a
new one when an instance needs a presentation context it does not have.
Files are streamed from disk as stored (:mod:`node.send.requestor`) unless
the peer refuses their syntax or the destination asks for another one; then
they are transcoded (see :mod:`node.send.transcode`).

Every outcome is classified (:mod:`node.send.failures`), so the caller knows
whether to count an instance as delivered, try again later, or give up.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import dsutils

from node.config import DestinationSection, DestinationTlsSection
from node.dicom.dimse import VERIFICATION
from node.dicom.files import is_dicomdir
from node.dicom.pdu import AbortSource, RejectResult
from node.dicom.status import Status
from node.send.failures import classify_status
from node.send.requestor import (
    Association,
    AssociationError,
    ConnectFailed,
    Lost,
    PeerAborted,
    Rejected,
)
from node.send.transcode import TranscodeError, prepare, proposals

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

log = logging.getLogger(__name__)

#: PS3.8: presentation context IDs are odd numbers 1-255.
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Peer:
    """Where and how to send: a configured destination, or the command line's host and port."""

    host: str
    port: int
    called_ae: str = "ANY-SCP"
    calling_ae: str = "DICOM_NODE"
    timeout: float = 60.0
    max_pdu: int = 0
    #: "as-stored", "none", "jpeg2000" or "rle" (see DestinationSection.transfer_syntax).
    transfer_syntax: str = "as-stored"
    #: Only these syntaxes are proposed; empty for any.
    accepted_syntaxes: tuple[str, ...] = ()
    storage_commitment: bool = False
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    name: str = ""

    @property
    def label(self) -> str:
        return f"{self.name + ' ' if self.name else ''}({self.called_ae}@{self.host}:{self.port})"

    def associate(self, contexts: list[tuple[str, list[str]]], max_pdu: int = 0) -> Association:
        """An association with this peer proposing ``contexts`` (raises AssociationError)."""
        return Association.request(
            self.host,
            self.port,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            contexts=contexts,
            timeout=self.timeout,
            max_pdu=max_pdu,
            tls=self.tls,
        )

    @classmethod
    def from_destination(cls, d: DestinationSection, node_ae: str) -> Peer:
        return cls(
            host=d.host,
            port=d.port,
            called_ae=d.ae_title,
            calling_ae=d.calling_ae_title or node_ae,
            timeout=d.timeout,
            max_pdu=d.max_pdu,
            transfer_syntax=d.transfer_syntax,
            accepted_syntaxes=tuple(d.accepted_transfer_syntaxes),
            storage_commitment=d.storage_commitment,
            tls=tls_context(d.tls, d.host) if d.tls.enabled else None,
            name=d.name,
        )


def tls_context(t: DestinationTlsSection, host: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(t.ca) if t.ca else None)
    ctx.check_hostname = bool(t.check_hostname)
    if t.certificate is not None:
        ctx.load_cert_chain(str(t.certificate), str(t.private_key))
    return ctx


@dataclass
class Item:
    """One instance to send: its file and what its File Meta says."""

    path: Path
    sop_class: str
    transfer_syntax: str
    sop_instance: str = ""
    #: The caller's key (a delivery id, or the path for the command line).
    key: object = None


@dataclass
class Result:
    item: Item
    #: "delivered", "transient" or "permanent".
    outcome: str
    status: int | None = None
    text: str = ""
    warning: str = ""
    sent_syntax: str = ""
    #: False when the item was never put on the wire (the association ended before it).
    attempted: bool = True
    #: The peer refused the association's first request by aborting: it refuses everything from us.
    refused_all: bool = False
    #: Transient: seconds the peer asked to wait before the next try (HTTP Retry-After); None: the back-off decides.
    retry_after: float | None = None


class AssociationFailed(Exception):
    """No usable association: ``kind`` is "transient" (try later) or "permanent" (the peer refuses)."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


class Sender:
    """An association to one peer, opened on demand and kept while it can carry what is sent."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.assoc: Association | None = None
        self._proposed: set[tuple[str, str]] = set()
        self._requests = 0

    # --- association ---------------------------------------------------------

    def _open(self, items: list[Item]) -> None:
        self.close()
        wanted = proposals(
            {(i.sop_class, i.transfer_syntax) for i in items}, self.peer.transfer_syntax, self.peer.accepted_syntaxes
        )
        contexts: list[tuple[str, list[str]]] = []
        proposed: set[tuple[str, str]] = set()
        for sop_class, syntaxes in wanted.items():
            for group in syntaxes:
                if len(contexts) >= MAX_CONTEXTS - 1:
                    break
                contexts.append((sop_class, list(group)))
                proposed.update((sop_class, ts) for ts in group)
        if self.peer.storage_commitment:
            contexts.append((STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        p = self.peer
        try:
            assoc = p.associate(contexts, max_pdu=p.max_pdu)
        except Rejected as e:
            kind = "transient" if e.result == RejectResult.TRANSIENT else "permanent"
            raise AssociationFailed(kind, f"{p.label} rejected the association ({e})") from None
        except ConnectFailed as e:
            raise AssociationFailed("transient", f"cannot connect to {p.label}: {e}") from None
        except (PeerAborted, Lost) as e:
            raise AssociationFailed("transient", f"{p.label}: {e}") from None
        if not assoc.accepted.contexts:
            refused = sorted({UID(a).name for a, _ in assoc.accepted.refused.values()})
            raise AssociationFailed(
                "permanent",
                f"{p.label} accepted none of the proposed presentation contexts ({', '.join(refused)}): it does "
                "not support these SOP classes or transfer syntaxes",
            )
        self.assoc = assoc
        self._requests = 0
        self._proposed = proposed
        self._accepted = set(assoc.accepted.contexts.values())
        self._refused_classes = {a for a, _ in assoc.accepted.refused.values()} - {
            a for a, _ in assoc.accepted.contexts.values()
        }

    def _covers(self, items: Iterable[Item]) -> bool:
        """Whether the open association proposed what these items need."""
        if self.assoc is None or not self.assoc.open:
            return False
        need = proposals(
            {(i.sop_class, i.transfer_syntax) for i in items}, self.peer.transfer_syntax, self.peer.accepted_syntaxes
        )
        return all((c, ts) in self._proposed for c, groups in need.items() for g in groups for ts in g)

    @property
    def open(self) -> bool:
        """Whether an association is held (the dispatcher releases it after its linger)."""
        return self.assoc is not None

    def close(self) -> None:
        if self.assoc is not None:
            self.assoc.release()
            self.assoc = None

    # --- sending ---------------------------------------------------------------

    def send(
        self,
        items: list[Item],
        on_result: Callable[[Result], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Result]:
        """Send items in order; returns a result per item (never raises for a peer's behaviour)."""
        results: list[Result] = []
        finished: set[int] = set()

        def done(r: Result) -> None:
            results.append(r)
            finished.add(id(r.item))
            if on_result:
                on_result(r)

        def rest() -> list[Item]:
            return [it for it in items if id(it) not in finished]

        # At most MAX_CONTEXTS/3 kinds of (SOP class, syntax) per association: send in groups.
        for group in _context_groups(items):
            if not self._covers(group):
                try:
                    self._open(group)
                except AssociationFailed as e:
                    for it in group:
                        done(Result(it, e.kind, None, e.text))
                    if e.kind == "transient":
                        # The rest would meet the same closed door; the caller retries later.
                        for it in rest():
                            done(Result(it, "transient", None, e.text))
                        return results
                    continue
            for it in group:
                if cancelled is not None and cancelled():
                    return results
                r = self._send_one(it)
                done(r)
                if r.refused_all:
                    for other in rest():
                        done(Result(other, "permanent", None, r.text))
                    self.close()
                    return results
                lost = self.assoc is None or not self.assoc.open
                if r.outcome == "transient" and (r.status is not None or lost):
                    # Out of resources (0xA7xx) or the association ended: stop here, the rest waits.
                    why = r.text if r.status is not None else f"not sent: {r.text}"
                    for other in rest():
                        done(Result(other, "transient", None, why, attempted=False))
                    self.close()
                    return results
        return results

    def _send_one(self, it: Item) -> Result:
        assoc = self.assoc
        assert assoc is not None
        label = self.peer.label
        if it.sop_class in self._refused_classes:
            return Result(
                it,
                "permanent",
                Status.SOP_CLASS_NOT_SUPPORTED,
                f"{label} does not support the SOP class {UID(it.sop_class).name} (presentation context rejected)",
            )
        try:
            what, sent_ts = prepare(
                it.path, it.sop_class, it.transfer_syntax, self._accepted, self.peer.transfer_syntax
            )
            cx_id = assoc.accepted.find(it.sop_class, sent_ts)
            if cx_id is None:
                raise TranscodeError(
                    f"{it.path.name}: no accepted presentation context for "
                    f"{UID(it.sop_class).name} in {UID(sent_ts).name}"
                )
            data = None if isinstance(what, Path) else encode_dataset(what, UID(sent_ts))
        except TranscodeError as e:
            return Result(it, "permanent", None, str(e))
        except OSError as e:
            return Result(it, "permanent", None, f"cannot read {it.path}: {e}")
        self._requests += 1
        try:
            if data is None:
                rsp = assoc.store(cx_id, it.sop_class, it.sop_instance, path=it.path)
            else:
                rsp = assoc.store(cx_id, it.sop_class, it.sop_instance, data=data)
        except PeerAborted as e:
            if e.source != AbortSource.SERVICE_USER:
                return Result(it, "transient", None, f"{label}: {e}", sent_syntax=sent_ts)
            # The peer's application refused the request by aborting (Orthanc does this for a calling AE
            # title it does not know): sending again would meet the same refusal.
            first = self._requests == 1
            text = f"{label} aborted the association instead of answering the C-STORE " + (
                "(its first request): it refuses us; check that it knows our calling AE title "
                f"{self.peer.calling_ae!r} from this host"
                if first
                else f"of this instance ({UID(it.sop_class).name}); see the destination's log"
            )
            return Result(it, "permanent", None, text, sent_syntax=sent_ts, refused_all=first)
        except (Lost, ValueError) as e:
            if isinstance(e, ValueError):  # the stored file is not what the index says
                return Result(it, "permanent", None, f"cannot send {it.path.name}: {e}")
            return Result(it, "transient", None, f"no response from {label}: {e}", sent_syntax=sent_ts)
        except OSError as e:
            return Result(it, "permanent", None, f"cannot read {it.path}: {e}")
        status = rsp.status if rsp.status is not None else Status.CANNOT_UNDERSTAND
        kind, text = classify_status(status, rsp.error_comment)
        if kind == "delivered":
            return Result(it, "delivered", status, "", warning=text, sent_syntax=sent_ts)
        return Result(it, kind, status, text, sent_syntax=sent_ts)

    # --- Storage Commitment ----------------------------------------------------

    def request_commitment(self, transaction_uid: str, refs: list[tuple[str, str]]) -> str:
        """N-ACTION Request Storage Commitment for (SOP class, SOP instance) pairs; "" or why it failed."""
        assoc = self.assoc
        if assoc is None or not assoc.open:
            return "the association ended before storage commitment could be requested"
        cx = next(((cx_id, ts) for cx_id, (a, ts) in assoc.accepted.contexts.items() if a == STORAGE_COMMITMENT), None)
        if cx is None:
            return f"{self.peer.label} does not accept Storage Commitment (its presentation context was rejected)"
        ds = Dataset()
        ds.TransactionUID = transaction_uid
        seq = []
        for cls_uid, inst_uid in refs:
            r = Dataset()
            r.ReferencedSOPClassUID = cls_uid
            r.ReferencedSOPInstanceUID = inst_uid
            seq.append(r)
        ds.ReferencedSOPSequence = seq
        try:
            rsp = assoc.n_action(
                cx[0], STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, 1, encode_dataset(ds, UID(cx[1]))
            )
        except AssociationError as e:
            return f"storage commitment request failed: {e}"
        if rsp.status != 0:
            return f"storage commitment request refused with status 0x{(rsp.status or 0):04X}"
        return ""


def encode_dataset(ds: Dataset, ts: UID) -> bytes:
    """A data set as bytes in an uncompressed or encapsulated transfer syntax's VR and byte order."""
    raw = dsutils.encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if raw is None:
        raise TranscodeError(f"cannot encode the data set in {ts.name}")
    return raw


def _context_groups(items: list[Item]) -> list[list[Item]]:
    """Split items (keeping their order within each group) so each group fits one association's contexts."""
    kinds: dict[tuple[str, str], int] = {}
    for it in items:
        kinds.setdefault((it.sop_class, it.transfer_syntax), len(kinds))
    per = (MAX_CONTEXTS - 2) // 3  # up to three contexts per kind: as stored, preferred, uncompressed
    if len(kinds) <= per:
        return [items] if items else []
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(kinds[(it.sop_class, it.transfer_syntax)] // per, []).append(it)
    return [groups[k] for k in sorted(groups)]


# --- the command line's use: files and folders --------------------------------


@dataclass
class SendSummary:
    sent: int = 0
    failed: int = 0
    warnings: int = 0
    #: DIMSE status -> count (None: no response).
    statuses: Counter[int | None] = field(default_factory=Counter)
    #: Files that are not DICOM (no File Meta), and why.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: DICOMDIRs found among the files: a media index, not an instance a peer stores (it answers 0xA900).
    dicomdirs: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.skipped


def file_item(path: Path) -> Item:
    """An item from a file's File Meta (raises ValueError for anything that is not a DICOM file with one)."""
    try:
        meta = read_file_meta_info(path)
        return Item(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.TransferSyntaxUID),
            str(meta.MediaStorageSOPInstanceUID),
            key=path,
        )
    except (InvalidDicomError, AttributeError, OSError, ValueError) as e:
        raise ValueError(f"not a DICOM file with File Meta: {e}") from None


def send_files(
    peer: Peer,
    files: list[Path],
    *,
    progress: Callable[[Path, int | None], None] | None = None,
    attempts: int = 1,
    retry_wait: float = 2.0,
) -> SendSummary:
    """Send files to a peer (the command line's ``send``), with the forwarder's sender.

    Transient failures (refused, reset, 0xA7xx) are tried again up to ``attempts`` times in all.
    """
    summary = SendSummary()
    items: list[Item] = []
    for f in files:
        try:
            item = file_item(f)
        except ValueError as e:
            summary.skipped.append((str(f), str(e)))
            item = None
        if item is not None and is_dicomdir(item.sop_class):
            summary.dicomdirs.append(str(f))
            item = None
        if item is not None:
            items.append(item)
        elif progress:
            progress(f, None)
    sender = Sender(peer)
    retry: list[Item] = []
    last = [attempts <= 1]

    def _one(r: Result) -> None:
        if r.outcome == "transient" and not last[0]:
            retry.append(r.item)
            return
        summary.statuses[r.status] += 1
        if r.outcome == "delivered":
            summary.sent += 1
            summary.warnings += bool(r.warning)
        else:
            summary.failed += 1
            summary.errors.append((str(r.item.path), r.text))
        if progress:
            progress(r.item.path, r.status)

    try:
        for attempt in range(1, attempts + 1):
            last[0] = attempt == attempts
            retry.clear()
            sender.send(items, _one)
            if not retry:
                break
            log.warning(
                "%d instance(s) not sent to %s (transient failure); trying again in %g s",
                len(retry),
                peer.label,
                retry_wait,
            )
            time.sleep(retry_wait)
            items = list(retry)
    finally:
        sender.close()
    return summary


def accepts(peer: Peer, sop_class: str) -> bool:
    """Whether ``peer`` accepts ``sop_class`` at association negotiation (nothing is sent).

    Raises ConnectionError when it cannot be asked (down, or it rejects the association).
    """
    try:
        assoc = peer.associate([(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
    except AssociationError as e:
        raise ConnectionError(f"no association with {peer.label}: {e}") from None
    try:
        return any(a == sop_class for a, _ in assoc.accepted.contexts.values())
    finally:
        assoc.release()


def echo(peer: Peer) -> int:
    """C-ECHO; returns the status (raises ConnectionError naming why there was no association)."""
    try:
        assoc = peer.associate([(VERIFICATION, [ImplicitVRLittleEndian])])
    except AssociationError as e:
        raise ConnectionError(f"no association with {peer.label}: {e}") from None
    if not assoc.accepted.contexts:
        raise ConnectionError(f"{peer.label} does not accept Verification")
    try:
        return int(assoc.echo(next(iter(assoc.accepted.contexts))).status or 0)
    except AssociationError as e:
        raise ConnectionError(f"no C-ECHO response from {peer.label}: {e}") from None
    finally:
        assoc.release()
