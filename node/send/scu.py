"""The C-STORE SCU: one sender for forwarding and ``dicom-node send``.

A :class:`Sender` holds one association to one peer and sends instances over
it one after another, reusing it while there is more to send and opening a
new one when an instance needs a presentation context it does not have.
Files are streamed from disk as stored (pynetdicom's chunked send) unless the
peer refuses their syntax or the destination asks for another one; then
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
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.pdu_primitives import A_ABORT
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from node.send import transport
from node.send.failures import Failure, classify_status, rejection_text
from node.send.transcode import TranscodeError, prepare, proposals

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

    @classmethod
    def from_destination(cls, d, node_ae: str) -> Peer:  # type: ignore[no-untyped-def]
        return cls(
            host=d.host, port=d.port, called_ae=d.ae_title, calling_ae=d.calling_ae_title or node_ae,
            timeout=d.timeout, max_pdu=d.max_pdu, transfer_syntax=d.transfer_syntax,
            accepted_syntaxes=tuple(d.accepted_transfer_syntaxes), storage_commitment=d.storage_commitment,
            tls=tls_context(d.tls, d.host) if d.tls.enabled else None, name=d.name,
        )  # fmt: skip


def tls_context(t, host: str) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
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


class AssociationFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


class Sender:
    """An association to one peer, opened on demand and kept while it can carry what is sent."""

    def __init__(self, peer: Peer) -> None:
        transport.install()
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.peer = peer
        self.assoc = None
        self._proposed: set[tuple[str, str]] = set()
        self.associations = 0

    # --- association ---------------------------------------------------------

    def _open(self, items: list[Item]) -> None:
        self.close()
        ae = AE(ae_title=self.peer.calling_ae)
        ae.maximum_pdu_size = self.peer.max_pdu
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.peer.timeout
        wanted = proposals({(i.sop_class, i.transfer_syntax) for i in items}, self.peer.transfer_syntax,
                           self.peer.accepted_syntaxes)  # fmt: skip
        contexts = 0
        proposed = set()
        for sop_class, syntaxes in wanted.items():
            for group in syntaxes:
                if contexts >= MAX_CONTEXTS - 1:
                    break
                ae.add_requested_context(sop_class, list(group))
                contexts += 1
                proposed.update((sop_class, ts) for ts in group)
        if self.peer.storage_commitment:
            ae.add_requested_context(StorageCommitmentPushModel)
        seen: dict[str, object] = {}

        def _acse(event: evt.Event) -> None:
            if isinstance(event.primitive, A_ABORT):  # (A_P_ABORT, the provider's, is not a decision of the peer)
                seen["user_abort"] = True

        def _conn(event: evt.Event) -> None:
            seen["connected"] = True

        handlers = [(evt.EVT_ACSE_RECV, _acse), (evt.EVT_CONN_OPEN, _conn)]
        tls_args = (self.peer.tls, self.peer.host) if self.peer.tls is not None else None
        assoc = ae.associate(self.peer.host, self.peer.port, ae_title=self.peer.called_ae, max_pdu=self.peer.max_pdu,
                             evt_handlers=handlers, tls_args=tls_args)  # fmt: skip
        self.associations += 1
        if not assoc.is_established:
            rsp = assoc.acceptor.primitive  # the A-ASSOCIATE-AC or -RJ, if one came
            if assoc.is_rejected and rsp is not None:
                raise AssociationFailed(rejection_text(rsp, self.peer.label))
            if seen.get("connected") and assoc.rejected_contexts and not assoc.accepted_contexts:
                refused = sorted({UID(cx.abstract_syntax).name for cx in assoc.rejected_contexts})
                raise AssociationFailed(Failure("permanent", None,
                    f"{self.peer.label} accepted none of the proposed presentation contexts "
                    f"({', '.join(refused)}): it does not support these SOP classes or transfer syntaxes"))  # fmt: skip
            if not seen.get("connected"):
                raise AssociationFailed(Failure("transient", None, f"cannot connect to {self.peer.label} "
                                                "(connection refused, unreachable or timed out)"))  # fmt: skip
            raise AssociationFailed(Failure("transient", None, f"{self.peer.label} aborted the association or did "
                                            f"not answer within {self.peer.timeout:g} s"))  # fmt: skip
        self.assoc = assoc
        self._seen = seen
        self._requests = 0
        self._proposed = proposed
        self._accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        self._refused_classes = {cx.abstract_syntax for cx in assoc.rejected_contexts} - {
            cx.abstract_syntax for cx in assoc.accepted_contexts
        }

    def _covers(self, items: Iterable[Item]) -> bool:
        """Whether the open association proposed what these items need."""
        if self.assoc is None or not self.assoc.is_established:
            return False
        need = proposals({(i.sop_class, i.transfer_syntax) for i in items}, self.peer.transfer_syntax,
                         self.peer.accepted_syntaxes)  # fmt: skip
        return all((c, ts) in self._proposed for c, groups in need.items() for g in groups for ts in g)

    def _settle(self, assoc, wait: float = 1.0) -> None:  # type: ignore[no-untyped-def]
        """After a send got no response: give the association's loop a moment to take in an abort.

        The DIMSE wait can end (the connection closed) before the loop has read the A-ABORT that
        says whether the peer's application refused us, and before the association counts as ended.
        """
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not assoc.is_aborted and not self._seen.get("user_abort"):
            if not assoc.dul.is_alive() and assoc.dul.to_user_queue.empty():
                break
            time.sleep(0.005)

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established and not self.assoc.is_aborted and self.assoc.dul.is_alive():
                    self.assoc.release()
                elif not self.assoc.is_aborted:
                    self.assoc.abort()
            except Exception:  # releasing a dead association must not fail the caller
                pass
            self.assoc = None

    # --- sending ---------------------------------------------------------------

    def send(self, items: list[Item], on_result: Callable[[Result], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> list[Result]:  # fmt: skip
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

        # At most MAX_CONTEXTS/2 kinds of (SOP class, syntax) per association: send in groups.
        for group in _context_groups(items):
            if not self._covers(group):
                try:
                    self._open(group)
                except AssociationFailed as e:
                    for it in group:
                        done(Result(it, e.failure.kind, None, e.failure.text))
                    if e.failure.kind == "transient":
                        # The rest would meet the same closed door; the caller retries later.
                        for it in rest():
                            done(Result(it, "transient", None, e.failure.text))
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
                lost = self.assoc is None or not self.assoc.is_established
                if r.outcome == "transient" and (r.status is not None or lost):
                    # Out of resources (0xA7xx) or the association ended: stop here, the rest waits.
                    why = r.text if r.status is not None else f"not sent: {r.text}"
                    for it in rest():
                        done(Result(it, "transient", None, why, attempted=False))
                    self.close()
                    return results
        return results

    def _send_one(self, it: Item) -> Result:
        assoc = self.assoc
        assert assoc is not None
        if it.sop_class in self._refused_classes:
            return Result(it, "permanent", 0x0122, f"{self.peer.label} does not support the SOP class "
                          f"{UID(it.sop_class).name} (presentation context rejected)")  # fmt: skip
        try:
            what, sent_ts = prepare(
                it.path, it.sop_class, it.transfer_syntax, self._accepted, self.peer.transfer_syntax
            )
        except TranscodeError as e:
            return Result(it, "permanent", None, str(e))
        except OSError as e:
            return Result(it, "permanent", None, f"cannot read {it.path}: {e}")
        try:
            rsp = assoc.send_c_store(what)
        except (ValueError, AttributeError) as e:
            return Result(it, "permanent", None, f"cannot send {it.path.name}: {e}")
        except (RuntimeError, OSError) as e:
            return Result(it, "transient", None, f"association to {self.peer.label} lost: {e}")
        self._requests += 1
        if not rsp or "Status" not in rsp:
            self._settle(assoc)
            if self._seen.get("user_abort"):
                # The peer's application refused the request by aborting (Orthanc does this for a calling AE
                # it does not know): sending again would meet the same refusal.
                first = self._requests == 1
                text = (f"{self.peer.label} aborted the association instead of answering the C-STORE "
                        + ("(its first request): it refuses us; check that it knows our calling AE title "
                           f"{self.peer.calling_ae!r} from this host" if first else
                           f"of this instance ({UID(it.sop_class).name}); see the destination's log"))  # fmt: skip
                return Result(it, "permanent", None, text, sent_syntax=sent_ts, refused_all=first)
            return Result(it, "transient", None, f"no response from {self.peer.label} (association lost, or no answer "
                          f"within {self.peer.timeout:g} s)", sent_syntax=sent_ts)  # fmt: skip
        status = int(rsp.Status)
        comment = str(rsp.get("ErrorComment", "") or "")
        kind, text = classify_status(status, comment)
        if kind == "delivered":
            return Result(it, "delivered", status, "", warning=text, sent_syntax=sent_ts)
        return Result(it, kind, status, text, sent_syntax=sent_ts)

    # --- Storage Commitment ----------------------------------------------------

    def request_commitment(self, transaction_uid: str, refs: list[tuple[str, str]]) -> str:
        """N-ACTION Request Storage Commitment for (SOP class, SOP instance) pairs; "" or why it failed."""
        assoc = self.assoc
        if assoc is None or not assoc.is_established:
            return "the association ended before storage commitment could be requested"
        if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
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
            status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        except (ValueError, RuntimeError, OSError) as e:
            return f"storage commitment request failed: {e}"
        if not status or "Status" not in status:
            return "no response to the storage commitment request"
        if int(status.Status) != 0:
            return f"storage commitment request refused with status 0x{int(status.Status):04X}"
        return ""


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
    statuses: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.skipped


def iter_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            out.append(p)
    return out


def file_item(path: Path) -> Item:
    """An item from a file's File Meta (raises ValueError for anything that is not a DICOM file with one)."""
    try:
        meta = read_file_meta_info(path)
        return Item(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID),
                    str(meta.MediaStorageSOPInstanceUID), key=path)  # fmt: skip
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
            items.append(file_item(f))
        except ValueError as e:
            summary.skipped.append((str(f), str(e)))
            if progress:
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
            log.warning("%d instance(s) not sent to %s (transient failure); trying again in %g s", len(retry),
                        peer.label, retry_wait)  # fmt: skip
            time.sleep(retry_wait)
            items = list(retry)
    finally:
        sender.close()
    return summary


def echo(peer: Peer) -> int:
    """C-ECHO; returns the status (raises ConnectionError naming why there was no association)."""
    transport.install()
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout
    ae.add_requested_context(Verification)
    tls_args = (peer.tls, peer.host) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {peer.label} (rejected, aborted or refused)")
    try:
        rsp = assoc.send_c_echo()
        if not rsp or "Status" not in rsp:
            raise ConnectionError("no C-ECHO response (timeout or abort)")
        return int(rsp.Status)
    finally:
        assoc.release()
