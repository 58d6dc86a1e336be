"""A C-STORE SCU that sends files as they are, several per association.

Files are streamed from disk (pynetdicom's chunked send), never decoded;
presentation contexts are proposed from what the files hold, at most 128
per association (PS3.8 limit on context IDs), so a folder with more kinds of
objects is sent over several associations.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from node.send import transport

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


@dataclass
class SendSummary:
    sent: int = 0
    failed: int = 0
    warnings: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
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


def echo(host: str, port: int, *, called_ae: str = "ANY-SCP", calling_ae: str = "DICOM_NODE", timeout: float = 10) -> int:
    """C-ECHO; returns the status (raises ConnectionError if no association)."""
    transport.install()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae}@{host}:{port} (rejected, aborted or refused)")
    try:
        rsp = assoc.send_c_echo()
        if not rsp or "Status" not in rsp:
            raise ConnectionError("no C-ECHO response (timeout or abort)")
        return int(rsp.Status)
    finally:
        assoc.release()


def _as_accepted(path: Path, key: tuple[UID, UID], accepted: set[tuple[str, str]]) -> Path | Dataset:
    """The file as stored when the peer took its syntax; else decoded for an uncompressed context.

    Only when the peer refused the stored syntax is the file read whole and, if compressed,
    decompressed (pixel values unchanged); otherwise it is streamed from disk untouched.
    """
    sop_class, ts = key
    if (sop_class, ts) in accepted:
        return path
    ds = dcmread(path)
    if ts.is_compressed:
        # Same instance, same UID: lossless decoding is not a new object (pydicom would make a new UID).
        ds.decompress(generate_instance_uid=False)  # to Explicit VR Little Endian (pylibjpeg/pyjpegls)
    log.info("sending %s decompressed (%s -> uncompressed): the peer did not accept %s", path.name, ts.name,
             ts.name)  # fmt: skip
    return ds


def send_files(
    host: str,
    port: int,
    files: list[Path],
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "DICOM_NODE",
    max_pdu: int = 0,
    timeout: float = 60,
    progress: Callable[[Path, int | None], None] | None = None,
) -> SendSummary:
    """Send ``files`` as stored (decompressed only for a peer that refuses their syntax).

    ``progress(path, status)`` is called per file.
    """
    transport.install()
    _config.STORE_SEND_CHUNKED_DATASET = True
    summary = SendSummary()
    by_context: dict[tuple[UID, UID], list[Path]] = defaultdict(list)
    file_key: dict[Path, tuple[UID, UID]] = {}
    for f in files:
        try:
            meta = read_file_meta_info(f)
            key = (UID(str(meta.MediaStorageSOPClassUID)), UID(str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as e:
            summary.skipped.append((str(f), f"not a DICOM file with File Meta: {e}"))
            if progress:
                progress(f, None)
            continue
        by_context[key].append(f)
        file_key[f] = key
    keys = list(by_context)
    # Each (SOP class, syntax) gets a context as stored and, when that syntax is not Explicit VR
    # Little Endian, a second one offering the uncompressed syntaxes: a peer that does not take the
    # stored syntax (DCMTK storescp's default takes uncompressed only) gets the file decompressed.
    per_batch = MAX_CONTEXTS // 2
    for start in range(0, len(keys), per_batch):
        batch = keys[start : start + per_batch]
        ae = AE(ae_title=calling_ae)
        ae.maximum_pdu_size = max_pdu
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for sop_class, ts in batch:
            ae.add_requested_context(sop_class, [ts])
            if ts != ExplicitVRLittleEndian:
                ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        batch_files = sorted((f for k in batch for f in by_context[k]), key=lambda p: str(p))
        assoc = ae.associate(host, port, ae_title=called_ae, max_pdu=max_pdu)
        if not assoc.is_established:
            for f in batch_files:
                summary.failed += 1
                summary.errors.append((str(f), "association rejected, aborted or refused"))
                if progress:
                    progress(f, None)
            continue
        try:
            accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            for n, f in enumerate(batch_files):
                status = None
                try:
                    rsp = assoc.send_c_store(_as_accepted(f, file_key[f], accepted))
                    status = int(rsp.Status) if rsp and "Status" in rsp else None
                except (ValueError, RuntimeError, OSError) as e:
                    summary.errors.append((str(f), str(e)))
                summary.statuses[status] += 1
                if status == 0:
                    summary.sent += 1
                elif status is not None and (status & 0xF000) == 0xB000:
                    summary.sent += 1
                    summary.warnings += 1
                else:
                    summary.failed += 1
                    if status is not None:
                        comment = str(rsp.get("ErrorComment", "")) if rsp else ""
                        summary.errors.append((str(f), f"status 0x{status:04X} {comment}".strip()))
                    elif not summary.errors or summary.errors[-1][0] != str(f):
                        summary.errors.append((str(f), "no response (association lost or DIMSE timeout)"))
                if progress:
                    progress(f, status)
                if not assoc.is_established:
                    for rest in batch_files[n + 1 :]:  # never attempted: they failed too
                        summary.failed += 1
                        summary.errors.append((str(rest), "not sent: the association ended before it"))
                        if progress:
                            progress(rest, None)
                    break
        finally:
            if assoc.is_established:
                assoc.release()
    return summary
