"""The durable write path: check, fsync, rename, index, and only then answer Success.

The order is what makes it safe. A crash before the rename leaves a temp
file (removed at start-up); between rename and commit, a stored file with no
row (indexed by recovery at start-up); after the commit, both. The sender
only ever sees Success for an instance whose bytes are on disk and whose row
is committed, and any failure removes what this request wrote.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID

from node import audit
from node.dicom.files import Rejected, read_header
from node.dicom.status import Status
from node.index.records import INDEX_WAIT, DuplicatePolicy, Recorder, RecordOutcome, to_record
from node.index.writer import IndexWriter, Tx
from node.receive.rxfile import ReceivedFile
from node.storage import Storage
from node.storage.layout import fsync_dir

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Peer:
    """Who sent an instance, for the index and the logs."""

    calling_ae: str = ""
    called_ae: str = ""
    address: str = ""
    association_id: str = ""


@dataclass(slots=True)
class StoreResult:
    status: int
    reason: str = ""
    outcome: str = ""  # "new", "duplicate", "replaced" on success


class Ingest:
    """Stores received data sets; shared by all associations (thread-safe)."""

    def __init__(
        self,
        storage: Storage,
        writer: IndexWriter,
        *,
        duplicates: DuplicatePolicy = "keep_first",
        min_free_bytes: int = 0,
        on_recorded: Callable[[RecordOutcome, dt.datetime], None] | None = None,
    ) -> None:
        """``on_recorded(outcome, received_at)`` is told of every committed row (the series tracker)."""
        self.storage = storage
        self.on_recorded = on_recorded
        self.writer = writer
        self.recorder = Recorder(duplicates, file_exists=lambda rel: self.storage.absolute(rel).is_file())
        self.min_free_bytes = min_free_bytes
        self._free, self._free_at = 0, -1.0

    def store(
        self,
        rx: ReceivedFile,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: UID,
        peer: Peer,
    ) -> StoreResult:
        """Store one received data set; never raises, always answers with a status."""
        try:
            return self._store(rx, sop_class_uid, sop_instance_uid, transfer_syntax, peer)
        except Rejected as r:
            log.warning(
                "refused %s from %s (%s): 0x%04X %s",
                sop_instance_uid,
                peer.calling_ae,
                peer.address,
                r.status,
                r.reason,
            )
            return StoreResult(r.status, r.reason)
        except OSError as e:
            reason = f"storage error: {e.strerror or e}"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                reason = "the storage filesystem is full"
            log.error(
                "could not store %s from %s (%s): %s (%s); answered 0xA700, the sender may retry once "
                "there is space again under node.data_dir",
                sop_instance_uid,
                peer.calling_ae,
                peer.address,
                reason,
                e,
            )
            return StoreResult(Status.OUT_OF_RESOURCES, reason)
        except Exception as e:  # a bug must not become pynetdicom's 0xC211 or kill the association
            log.exception("unexpected failure storing %s from %s", sop_instance_uid, peer.calling_ae)
            return StoreResult(Status.OUT_OF_RESOURCES, f"internal error: {type(e).__name__}")
        finally:
            rx.discard()  # removes the temp file on failure; nothing left to remove after the rename

    def _free_bytes(self) -> int:
        """Free space, measured at most every 0.5 s (a statfs per instance adds up)."""
        now = time.monotonic()
        if now - self._free_at > 0.5:
            self._free = self.storage.free_bytes()
            self._free_at = now
        return self._free

    def _store(self, rx: ReceivedFile, sop_class_uid: str, sop_instance_uid: str, ts: UID, peer: Peer) -> StoreResult:
        if rx.error is not None:  # the data set could not be written (it was read to its end and dropped)
            raise rx.error
        if self.min_free_bytes:
            free = self._free_bytes()
            if free < self.min_free_bytes:
                raise Rejected(
                    Status.OUT_OF_RESOURCES,
                    f"storage has {free // 2**20} MiB free, below node.min_free_mb "
                    f"({self.min_free_bytes // 2**20} MiB)",
                )
        header = read_header(rx.name, ts, rx.size, rx.dataset_offset, head=rx.head)
        ds_class = header.text("SOPClassUID")
        ds_inst = header.text("SOPInstanceUID")
        if ds_class != sop_class_uid.strip():
            raise Rejected(
                Status.DATASET_MISMATCH,
                f"SOP Class UID in the data set ({ds_class or 'missing'}) differs from the request ({sop_class_uid})",
            )
        if ds_inst != sop_instance_uid.strip():
            raise Rejected(
                Status.DATASET_MISMATCH,
                f"SOP Instance UID in the data set ({ds_inst or 'missing'}) differs from the request "
                f"({sop_instance_uid})",
            )
        # Without a Study/Series Instance UID (Type 1 in every IOD) the instance
        # does not conform, but its bytes are intact: store it and say so
        # (0xB007) rather than lose it; the index files it under an empty UID.
        missing = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID") if not header.text(kw)]
        warning = ""
        if missing:
            warning = f"stored, but the data set has no {' or '.join(missing)} (Type 1)"

        final = self.storage.path_for(header.text("SeriesInstanceUID"), ds_inst)
        relative = self.storage.relative(final)

        record = to_record(
            header,
            file_path=relative,
            file_size=rx.size,
            checksum=rx.checksum(),
            calling_ae=peer.calling_ae,
            called_ae=peer.called_ae,
            peer_address=peer.address,
            association_id=peer.association_id,
        )
        rx.sync()  # the data is durable before it gets its final name
        rx.close()
        self.storage.place(rx.name, final)
        rx.placed()
        # The index commit (in the writer thread) and the directory fsync that
        # makes the rename durable (here) run side by side; Success waits for both.
        # The audit row goes into the same transaction (and savepoint) as the index rows: an instance
        # is never indexed without its audit row, nor audited without being indexed.
        event = audit.row(
            "instance_stored",
            at=record.received_at,
            actor=peer.calling_ae,
            calling_ae=peer.calling_ae,
            called_ae=peer.called_ae,
            peer_address=peer.address,
            study_uid=record.study["study_instance_uid"],
            series_uid=record.series["series_instance_uid"],
            sop_instance_uid=ds_inst,
            status=Status.STORED_NONCONFORMANT if warning else Status.SUCCESS,
            detail=f"association {peer.association_id}" if peer.association_id else "",
        )

        detail = event["detail"]

        def work(tx: Tx) -> RecordOutcome:  # may run twice (the writer retries after a conflict): no "+="
            outcome = self.recorder.record(tx, record)
            event["kind"], event["detail"] = "instance_stored", detail
            if outcome.kind == "duplicate":
                event["kind"], event["detail"] = "instance_duplicate", detail + " (first copy kept)"
            elif outcome.kind == "replaced":
                event["detail"] = detail + " (replaced the stored copy)"
            audit.write_tx(tx, event)
            return outcome

        recorded = self.writer.submit(work)
        try:
            fsync_dir(final.parent)
            unsynced: OSError | None = None
        except OSError as e:  # answered with 0xA700 below, once the row is settled (a retry is a duplicate)
            unsynced = e
        try:
            outcome: RecordOutcome = recorded.result(timeout=INDEX_WAIT)
        except TimeoutError:
            if not recorded.cancel():  # already being committed: its result is moments away
                outcome = recorded.result()
            else:
                self.storage.remove(final)
                raise Rejected(
                    Status.OUT_OF_RESOURCES, f"the index did not take the instance within {INDEX_WAIT:.0f} s"
                ) from None
        except Exception as e:
            self.storage.remove(final)
            raise Rejected(Status.OUT_OF_RESOURCES, f"the index could not record it: {e}") from None
        if self.on_recorded is not None and not missing:  # no series to track without its UIDs
            try:
                self.on_recorded(outcome, record.received_at)
            except Exception:  # the instance is stored; the tracker re-arms from the table on restart
                log.exception("the series tracker could not take note of %s", ds_inst)
        if outcome.kind != "new" and outcome.old_file_path == relative:
            # The row already names this very file: another process's crash recovery indexed it meanwhile, or the
            # index transaction ran again after its commit's answer was lost. It is ours: keep it.
            log.warning("%s from %s was already indexed as this very file", ds_inst, peer.calling_ae)
        elif outcome.kind == "duplicate":
            self.storage.remove(final)
            log.info(
                "duplicate %s from %s: kept the first copy (node.duplicates = keep_first)",
                ds_inst,
                peer.calling_ae,
            )
        elif outcome.kind == "replaced" and outcome.old_file_path:
            old = self.storage.absolute(outcome.old_file_path)
            if old.is_file():
                self.storage.remove(old)
                log.info(
                    "duplicate %s from %s: replaced the stored copy (node.duplicates = %s)",
                    ds_inst,
                    peer.calling_ae,
                    self.recorder.policy,
                )
            else:
                log.warning("%s from %s restores an indexed instance whose file was missing", ds_inst, peer.calling_ae)
        if unsynced is not None:
            raise unsynced
        if warning:
            log.warning("stored %s from %s with warning 0xB007: %s", ds_inst, peer.calling_ae, warning)
            return StoreResult(Status.STORED_NONCONFORMANT, warning, outcome=outcome.kind)
        return StoreResult(Status.SUCCESS, outcome=outcome.kind)
