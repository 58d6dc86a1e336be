"""STOW-RS (PS3.18 10.5): a multipart/related body of Part 10 files, streamed into the C-STORE write path.

The body is never held in memory: python_multipart's parser hands each part's bytes over as they arrive.
Only the start of a part (preamble, "DICM", File Meta) is buffered until the File Meta is complete; then
the node's own File Meta (as for C-STORE) goes into a ``ReceivedFile`` followed by the data set bytes
unchanged. At the end of each part the file goes through ``Ingest.store`` (check, fsync, rename, index
row): the same durable path as C-STORE, so the answer is sent only once every stored instance is durable,
and the series tracker and the rules see them like any other instance. Stores run on a few threads while
the next parts arrive, so the index writer can commit them in batches.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from node import metrics
from node.dicom import dimse
from node.dicom.files import Rejected, read_header
from node.dicom.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.dicom.status import Status
from node.receive.ingest import Ingest, Peer
from node.receive.rxfile import ReceivedFile

log = logging.getLogger(__name__)

#: A File Meta group larger than this is not a real one (they are a few hundred bytes).
MAX_FILE_META = 64 * 1024
#: Stores running or waiting while the next parts arrive (each holds one temp file).
MAX_PENDING = 8
#: PS3.18 Table 10.5.3-2 failure reasons beyond the DIMSE statuses.
PROCESSING_FAILURE = Status.CANNOT_UNDERSTAND  # 0xC000
STUDY_MISMATCH = 0xA900
#: Explicit VR elements with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())


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


def split_file_meta(head: bytes | bytearray) -> tuple[Dataset, int] | None:
    """The File Meta of a Part 10 file's start and where its data set begins; None: more bytes needed.

    Raises ValueError (with what is wrong) for something that is not a Part 10 file. The group is walked
    element by element (Explicit VR Little Endian, PS3.10 7.1) rather than trusting its group length.
    """
    if len(head) < 132:
        return None
    if head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file: no 128-byte preamble followed by 'DICM'")
    pos = 132
    while True:
        if len(head) < pos + 6:
            if len(head) >= MAX_FILE_META:
                _too_long()
            return None
        group, _elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = bytes(head[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if len(head) < pos + 12:
                return None
            length = struct.unpack_from("<L", head, pos + 8)[0]
            pos += 12 + length
        else:
            if len(head) < pos + 8:
                return None
            pos += 8 + struct.unpack_from("<H", head, pos + 6)[0]
        if pos > MAX_FILE_META:
            _too_long()
    if pos == 132:
        raise ValueError("not a DICOM Part 10 file: no File Meta Information (group 0002) after 'DICM'")
    try:
        meta = read_dataset(io.BytesIO(bytes(head[132:pos])), is_implicit_VR=False, is_little_endian=True)
        ts = str(meta.get("TransferSyntaxUID", "") or "").strip()
    except Exception as e:
        raise ValueError(f"the File Meta Information cannot be read: {e}") from None
    if not ts:
        raise ValueError("the File Meta has no Transfer Syntax UID (0002,0010)")
    if not UID(ts).is_transfer_syntax:
        raise ValueError(f"transfer syntax {ts} in the File Meta is not one this node can read")
    return meta, pos


def _too_long() -> NoReturn:
    raise ValueError(f"the File Meta Information is longer than {MAX_FILE_META} bytes: not a real one")


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
        executor: ThreadPoolExecutor,
    ) -> None:
        self.ingest = ingest
        self.peer = peer
        self.study = study
        self.executor = executor
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
        self._add(self.executor.submit(self._store, rx, meta, number))
        # Bounded: each pending store holds a temp file; wait for the oldest before reading on.
        pending = [r for r in self.results if isinstance(r, Future) and not r.done()]
        if len(pending) >= MAX_PENDING:
            pending[0].result()

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
        # A File Meta without the SOP UIDs does not lose the instance: the data set names them.
        sop_class = sop_class or header.text("SOPClassUID")
        sop_instance = sop_instance or header.text("SOPInstanceUID")
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
