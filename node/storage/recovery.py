"""Start-up reconciliation of the files and the index after a crash.

After a clean shutdown the node leaves a marker and start-up only clears
temporary files. Without the marker (kill -9, power loss) every stored file
is compared with the index: a file renamed into place whose row was never
committed is indexed now (the sender may not have had Success, but the bytes
are complete and fsync'ed, so keeping them loses nothing); a file whose SOP
Instance UID is indexed under another path (an interrupted overwrite) is
moved to ``quarantine/``; a row whose file is missing is reported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.dicom.files import file_checksum, read_file_header
from node.dicom.identity import DERIVED_UID_ROOT
from node.index.models import Instance
from node.index.records import Recorder, mark_not_tracked, to_record
from node.index.writer import IndexWriter
from node.storage.layout import Storage, fsync_dir

log = logging.getLogger(__name__)

CLEAN_MARKER = "clean-shutdown"
RECOVERY_BATCH = 1000
MISSING_LISTED = 1000


@dataclass
class RecoveryReport:
    temp_removed: int = 0
    full_scan: bool = False
    files_checked: int = 0
    indexed: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    #: The first MISSING_LISTED SOP Instance UIDs whose file is missing, and how many there are.
    missing_files: list[str] = field(default_factory=list)
    missing_count: int = 0


def mark_clean(storage: Storage) -> None:
    """Record a clean stop durably (file and directory entry), so the next start may skip the scan."""
    path = storage.root / CLEAN_MARKER
    with open(path, "w") as fp:
        fp.write("dicom-node stopped cleanly\n")
        fp.flush()
        os.fsync(fp.fileno())
    fsync_dir(storage.root)


def recover(
    storage: Storage, sessions: sessionmaker[Session], writer: IndexWriter, *, force_scan: bool = False
) -> RecoveryReport:
    """Reconcile; ``writer`` must be running (it records re-indexed files)."""
    report = RecoveryReport()
    for p in sorted(storage.tmp.rglob("*"), reverse=True):  # files before their directories
        if p.is_file():
            p.unlink()
            report.temp_removed += 1
        elif p.is_dir():
            p.rmdir()
    if report.temp_removed:
        log.info("recovery: removed %d incomplete temporary file(s)", report.temp_removed)
    marker = storage.root / CLEAN_MARKER
    clean = marker.exists()
    if clean:
        # Durably gone before we accept anything: a crash from here on must
        # lead to a full scan at the next start.
        marker.unlink()
        fsync_dir(storage.root)
    if clean and not force_scan:
        return report
    report.full_scan = True
    log.info("recovery: the last run did not stop cleanly; comparing storage with the index")
    recorder = Recorder("keep_first", file_exists=lambda rel: (storage.root / rel).is_file())
    # Files -> index, in batches, so memory stays bounded with millions of instances.
    batch: list[tuple[Path, str]] = []

    def check(batch: list[tuple[Path, str]]) -> None:
        with sessions() as s:
            known = set(
                s.execute(select(Instance.file_path).where(Instance.file_path.in_([r for _p, r in batch]))).scalars()
            )
        for path, rel in batch:
            if rel not in known:
                _adopt(storage, writer, recorder, path, rel, report)

    for path in storage.iter_stored():
        report.files_checked += 1
        batch.append((path, storage.relative(path)))
        if len(batch) >= RECOVERY_BATCH:
            check(batch)
            batch = []
    if batch:
        check(batch)
    # Index -> files, streamed in id order.
    with sessions() as s:
        rows = s.execute(
            select(Instance.file_path, Instance.sop_instance_uid)
            .order_by(Instance.id)
            .execution_options(yield_per=RECOVERY_BATCH)
        )
        for rel, uid in rows:
            if not (storage.root / rel).is_file():
                report.missing_count += 1
                if len(report.missing_files) < MISSING_LISTED:
                    report.missing_files.append(uid)
    if report.missing_count:
        log.error(
            "recovery: %d indexed instance(s) have no file (first: %s); they cannot be served or forwarded",
            report.missing_count,
            ", ".join(report.missing_files[:5]),
        )
    log.info(
        "recovery: checked %d file(s), indexed %d unindexed file(s), quarantined %d",
        report.files_checked,
        len(report.indexed),
        len(report.quarantined),
    )
    return report


def _adopt(
    storage: Storage,
    writer: IndexWriter,
    recorder: Recorder,
    path: Path,
    rel: str,
    report: RecoveryReport,
) -> None:
    try:
        header, size, meta = read_file_header(path)
        record = to_record(
            header,
            file_path=rel,
            file_size=size,
            checksum=file_checksum(path),
            association_id="recovered",
            calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
        )
    except Exception as e:  # unreadable: keep the bytes, out of the way
        _quarantine(storage, path, report, f"unreadable ({e})")
        return
    # An index failure here is not the file's fault: it propagates and stops
    # the start-up with the reason, leaving the file where it is.
    outcome = writer.call(lambda tx: recorder.record(tx, record))
    if outcome.series_id and record.sop_instance_uid.startswith(DERIVED_UID_ROOT):
        # one of the node's own outputs, stored just before a crash: not a series for the rules
        writer.call(lambda tx: mark_not_tracked(tx, outcome.series_id))
    if outcome.kind == "new":
        report.indexed.append(record.sop_instance_uid)
        log.warning(
            "recovery: indexed %s (%s), stored before a crash but not yet indexed", record.sop_instance_uid, rel
        )
    else:
        _quarantine(storage, path, report, f"{record.sop_instance_uid} is already indexed under another file")


def _quarantine(storage: Storage, path: Path, report: RecoveryReport, why: str) -> None:
    target = storage.quarantine / path.name
    os.replace(path, target)
    report.quarantined.append(str(target))
    log.warning("recovery: moved %s to %s: %s", path, target, why)
