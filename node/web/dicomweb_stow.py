"""STOW-RS (PS3.18 10.5): a multipart/related body of Part 10 files, streamed into the C-STORE write path.

The body is never held in memory: python_multipart's parser hands each part's bytes over as they arrive.
Only the start of a part (preamble, "DICM", File Meta) is buffered until the File Meta is complete; then
the node's own File Meta (as for C-STORE) goes into a ``ReceivedFile`` followed by the data set bytes
unchanged. At the end of each part the file goes through ``Ingest.store`` (check, fsync, rename, index
row): the same durable path as C-STORE, so the answer is sent only once every stored instance is durable,
and the series tracker and the rules see them like any other instance. Stores run on a few threads (one
:class:`StorePool` for the whole web app) while the next parts arrive, so the index writer can commit them
in batches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from node import metrics
from node.dicom import dimse
from node.dicom.files import Rejected, read_header, split_file_meta
from node.dicom.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.dicom.status import Status
from node.receive.ingest import Ingest, Peer
from node.receive.rxfile import ReceivedFile

log = logging.getLogger(__name__)

#: Threads storing STOW-RS parts, for all requests together (storing is fsync-bound, not CPU-bound).
STORE_THREADS = 4
#: Stores running or waiting, for all requests together (each holds one temp file); a request whose part
#: would exceed it waits before reading on, so many clients cannot fill storage.tmp or memory.
MAX_PENDING = 16
#: PS3.18 Table 10.5.3-2 failure reasons beyond the DIMSE statuses.
PROCESSING_FAILURE = Status.CANNOT_UNDERSTAND  # 0xC000
STUDY_MISMATCH = 0xA900


class MalformedBody(ValueError):
    """The multipart body itself is broken (not one of its parts): HTTP 400."""


@dataclass(slots=True)
class PartResult:
    """What became of one part: stored (status < 0xA000 and not 0xC000-ish) or failed, and why."""

    status: int
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    outcome: str = ""

    @property
    def stored(self) -> bool:
        return self.status == Status.SUCCESS or (self.status & 0xF000) == 0xB000


class StorePool:
    """The threads that store STOW-RS parts, shared by every request of the web app, and the bound on stores
    waiting for them (a new pool per request would let N clients start 4N threads and 8N temp files)."""

    def __init__(self, threads: int = STORE_THREADS, pending: int = MAX_PENDING) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="stow")
        self._slots = threading.BoundedSemaphore(pending)

    def submit(self, fn: Callable[..., PartResult], *args: Any) -> Future[PartResult]:
        """Run ``fn`` on a pool thread; blocks (the calling request's reading) while MAX_PENDING stores wait."""
        self._slots.acquire()
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _f: self._slots.release())
        return future

    def shutdown(self) -> None:
        """Finish the stores under way (their clients wait for the answer), then stop the threads."""
        self._executor.shutdown(wait=True)


@dataclass
class _Part:
    """The part being received."""

    content_type: str = ""
    head: bytearray = field(default_factory=bytearray)
    rx: ReceivedFile | None = None
    meta: Dataset | None = None
    failed: PartResult | None = None


class StowReceiver:
    """Parses one STOW-RS request body as it arrives and stores its parts; feed() then finish().

    Not thread-safe: one request, fed chunk by chunk (from a worker thread: parsing and writing block).
    """

    def __init__(
        self,
        boundary: str,
        ingest: Ingest,
        peer: Peer,
        *,
        study: str | None = None,
        pool: StorePool,
    ) -> None:
        self.ingest = ingest
        self.peer = peer
        self.study = study
        self.pool = pool
        self.results: list[Future[PartResult] | PartResult] = []
        self._part: _Part | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._ended = False
        self._parts = 0
        callbacks: dict[str, Callable[..., Any]] = {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._on_end,
        }
        self.parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    # --- parser callbacks -------------------------------------------------------------------------

    def _begin(self) -> None:
        self._part = _Part()

    def _header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        if name == "content-type" and self._part is not None:
            self._part.content_type = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or part.failed is not None:
            return  # the rest of a failed part is read and dropped
        chunk = memoryview(data)[start:end]
        if part.rx is not None:
            part.rx.write(chunk)
            return
        if len(part.head) == 0:
            media = part.content_type.split(";")[0].strip().lower()
            if media and media != "application/dicom":
                part.failed = PartResult(
                    PROCESSING_FAILURE,
                    f"part {self._parts + 1} is {media}: only application/dicom parts (Part 10 files) are accepted",
                )
                return
        part.head += chunk
        try:
            found = split_file_meta(part.head)
        except ValueError as e:
            part.failed = PartResult(PROCESSING_FAILURE, f"part {self._parts + 1}: {e}")
            part.head = bytearray()
            return
        if found is None:
            return
        meta, offset = found
        part.meta = meta
        try:
            rx = ReceivedFile(self.ingest.storage.tmp)
        except OSError as e:
            rx = ReceivedFile.unwritable(e)
        rx.write(
            dimse.encode_file_meta(
                str(meta.get("MediaStorageSOPClassUID", "") or ""),
                str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
                str(meta.TransferSyntaxUID),
                IMPLEMENTATION_CLASS_UID,
                IMPLEMENTATION_VERSION_NAME,
                self.peer.calling_ae,
            )
        )
        rx.dataset_offset = rx.size
        rx.write(memoryview(part.head)[offset:])
        part.rx, part.head = rx, bytearray()

    def _end(self) -> None:
        part, self._part = self._part, None
        self._parts += 1
        if part is None:
            return
        if part.failed is not None:
            self._add(part.failed)
            return
        if part.rx is None:
            what = "is empty" if not part.head else "ends inside its File Meta"
            self._add(PartResult(PROCESSING_FAILURE, f"part {self._parts} {what}: not a DICOM Part 10 file"))
            return
        assert part.meta is not None
        rx, meta, number = part.rx, part.meta, self._parts
        self._add(self.pool.submit(self._store, rx, meta, number))

    def _on_end(self) -> None:
        self._ended = True

    def _add(self, result: Future[PartResult] | PartResult) -> None:
        self.results.append(result)

    # --- storing ----------------------------------------------------------------------------------

    def _store(self, rx: ReceivedFile, meta: Dataset, number: int) -> PartResult:
        """One part into the C-STORE write path; runs on the executor, never raises."""
        try:
            return self._store_part(rx, meta, number)
        except Exception as e:  # a bug must not lose the other parts' answers nor leave the temp file
            rx.discard()
            log.exception("STOW-RS from %s: part %d could not be stored", self.peer.address, number)
            return PartResult(Status.OUT_OF_RESOURCES, f"part {number}: internal error: {type(e).__name__}")

    def _store_part(self, rx: ReceivedFile, meta: Dataset, number: int) -> PartResult:
        ts = UID(str(meta.TransferSyntaxUID))
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "").strip()
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
        if rx.error is not None:  # the storage is full: Ingest answers 0xA700 and removes what is left
            failed = self.ingest.store(
                rx, sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=ts, peer=self.peer
            )
            return PartResult(failed.status, f"part {number}: {failed.reason}", sop_class, sop_instance)
        try:
            header = read_header(rx.name, ts, rx.size, rx.dataset_offset, head=rx.head)
        except (Rejected, OSError) as e:
            rx.discard()
            status, why = (e.status, e.reason) if isinstance(e, Rejected) else (Status.OUT_OF_RESOURCES, str(e))
            log.warning("STOW-RS from %s: part %d refused: %s", self.peer.address, number, why)
            return PartResult(status, f"part {number}: {why}", sop_class, sop_instance)
        study, series = header.text("StudyInstanceUID"), header.text("SeriesInstanceUID")
        if not (sop_class and sop_instance):
            # A File Meta without the SOP UIDs does not lose the instance: the data set names them, and the
            # stored file gets a File Meta that names them too (what WADO-RS serves and destinations forward).
            sop_class = sop_class or header.text("SOPClassUID")
            sop_instance = sop_instance or header.text("SOPInstanceUID")
            if not (sop_class and sop_instance):
                rx.discard()
                reason = f"part {number}: neither its File Meta nor its data set has a SOP Class and Instance UID"
                log.warning("STOW-RS from %s: %s", self.peer.address, reason)
                return PartResult(PROCESSING_FAILURE, reason, sop_class, sop_instance, study, series)
            try:
                rx = self._with_file_meta(rx, sop_class, sop_instance, ts)
            except OSError as e:
                log.error("STOW-RS from %s: part %d could not be copied: %s", self.peer.address, number, e)
                return PartResult(
                    Status.OUT_OF_RESOURCES, f"part {number}: storage error: {e}", sop_class, sop_instance
                )
        if self.study is not None and study != self.study:
            rx.discard()
            reason = f"part {number}: not the study of the URL: its Study Instance UID is {study or 'missing'}"
            log.warning("STOW-RS from %s: %s (%s)", self.peer.address, reason, self.study)
            return PartResult(STUDY_MISMATCH, reason, sop_class, sop_instance, study, series)
        size = rx.size - rx.dataset_offset
        result = self.ingest.store(
            rx, sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=ts, peer=self.peer
        )
        stored = PartResult(result.status, result.reason, sop_class, sop_instance, study, series, result.outcome)
        if stored.stored:
            if result.outcome == "duplicate":
                metrics.DUPLICATES_RECEIVED.inc()
            else:
                metrics.INSTANCES_RECEIVED.inc()
                metrics.BYTES_RECEIVED.inc(size)
        else:
            stored.reason = f"part {number}: {result.reason}"
        return stored

    def _with_file_meta(self, rx: ReceivedFile, sop_class: str, sop_instance: str, ts: UID) -> ReceivedFile:
        """A copy of ``rx`` whose File Meta names the SOP Class and Instance UIDs (rare: a copy is fine).

        The File Meta was written before the data set arrived, from the part's own File Meta; the data set
        bytes are copied unchanged. ``rx`` is removed either way; OSError when the copy cannot be written.
        """
        fixed: ReceivedFile | None = None
        try:
            fixed = ReceivedFile(self.ingest.storage.tmp)
            meta = dimse.encode_file_meta(
                sop_class,
                sop_instance,
                str(ts),
                IMPLEMENTATION_CLASS_UID,
                IMPLEMENTATION_VERSION_NAME,
                self.peer.calling_ae,
            )
            fixed.write(meta)
            fixed.dataset_offset = fixed.size
            with open(rx.name, "rb") as src:
                src.seek(rx.dataset_offset)
                while chunk := src.read(1024 * 1024):
                    fixed.write(chunk)
            if fixed.error is not None:
                raise fixed.error
            return fixed
        except BaseException:
            if fixed is not None:
                fixed.discard()
            raise
        finally:
            rx.discard()

    # --- driving ----------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            self.abandon()
            raise MalformedBody(f"the multipart body cannot be parsed: {e}") from None
        except BaseException:  # a bug: the temp file of the part being received must not stay behind
            self.abandon()
            raise

    def finish(self) -> list[PartResult]:
        """Every part's result, once all stores have ended; MalformedBody if the body stopped mid-way."""
        self.parser.finalize()
        if not self._ended:
            cut = self._part is not None
            self.abandon()
            done = self.collect()
            stored = sum(r.stored for r in done)
            raise MalformedBody(
                "the multipart body ended before its closing boundary"
                + (f" (inside part {self._parts + 1}, which was discarded)" if cut else "")
                + f"; {stored} instance(s) before it were stored"
            )
        return self.collect()

    def collect(self) -> list[PartResult]:
        return [r.result() if isinstance(r, Future) else r for r in self.results]

    def abandon(self) -> None:
        """The body broke off: the part being received is dropped (nothing half-stored)."""
        part, self._part = self._part, None
        if part is not None and part.rx is not None:
            part.rx.discard()

    @property
    def parts(self) -> int:
        return self._parts
