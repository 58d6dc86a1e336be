"""Reconciling the files and the index after a node process stopped without a clean stop.

A node process stores an instance in steps: it writes the data set into its own temp directory
(``tmp/<process>/``), fsyncs it, renames it into ``storage/`` and commits its row. A process that stops
cleanly leaves nothing behind and records that in its ``node_process`` row (``stopped_at``,
node.index.cluster). One that did not (kill -9, power loss, a lease that ran out) may have left:

- temp files: never acknowledged, incomplete: removed;
- a file renamed into place whose row never committed: indexed now (the sender may not have had
  Success, but the bytes are complete and fsync'ed, so keeping them loses nothing);
- a file whose SOP Instance UID is indexed under another path (an interrupted overwrite): moved to
  ``quarantine/<process>/`` of the process that reconciles;

and, whatever the cause, an indexed row may have lost its file: reported (at start-up).

Which file a process stored is not recorded, so reconciling compares all of storage with the index.
That must not race the ingest of processes that are alive: a file one of them has just renamed into
place is not indexed yet. A file is therefore only adopted when it changed last before a cut-off:

- at start with no other process alive, the cut-off is the start: everything is reconciled at once,
  before the DICOM port opens, as a single node always did;
- otherwise, on each heartbeat, the holder of duty "recovery" reconciles the processes whose lease
  ended more than :data:`SETTLE` ago (INDEX_WAIT, the longest an ingest waits for its row, plus a
  margin), adopting only files older than that: by then a live process has indexed its file or
  removed it again. It runs in a thread of its own (a full scan must not hold up the heartbeat).

A data directory written by a version without process rows has a ``clean-shutdown`` marker file when
that version stopped cleanly: honoured once (and removed), and without it the first start scans.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, select

from node.dicom.files import file_checksum, read_file_header
from node.dicom.identity import DERIVED_UID_ROOT
from node.index.cluster import (
    Membership,
    ProcessRow,
    crashed,
    file_name,
    hold_duty,
    mark_recovered,
    processes,
    release_duty,
)
from node.index.models import Instance, utcnow
from node.index.records import INDEX_WAIT, Recorder, mark_not_tracked, to_record
from node.index.writer import IndexWriter
from node.storage.layout import Storage, fsync_dir

log = logging.getLogger(__name__)

#: Written by versions without process rows at a clean stop; read (once) for such a data directory.
LEGACY_CLEAN_MARKER = "clean-shutdown"
RECOVERY_BATCH = 1000
MISSING_LISTED = 1000
#: How long after its last change a stored file may still be on its way into a live process's index.
SETTLE = INDEX_WAIT + 60.0
DUTY = "recovery"

_i = Instance.__table__


@dataclass
class RecoveryReport:
    #: The node processes whose leftovers were reconciled (empty for an older version's data directory).
    processes: list[str] = field(default_factory=list)
    temp_removed: int = 0
    full_scan: bool = False
    files_checked: int = 0
    #: Unindexed files left alone because they changed after the cut-off (a live process may be indexing them).
    too_recent: int = 0
    indexed: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    #: The first MISSING_LISTED SOP Instance UIDs whose file is missing, and how many there are.
    missing_files: list[str] = field(default_factory=list)
    missing_count: int = 0


class RecoveryStopped(Exception):
    """A reconciliation gave up part-way (the node stops, or the duty went to another process)."""


class Recovery:
    """What this node process does about what other (or earlier) processes left in the data directory.

    ``clock`` is the time reconciliation judges ages by (tests move it forward instead of waiting).
    """

    def __init__(
        self,
        storage: Storage,
        writer: IndexWriter,
        membership: Membership,
        *,
        settle: float = SETTLE,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.storage = storage
        self.writer = writer
        self.membership = membership
        self.engine: Engine = membership.engine
        self.settle = settle
        self.clock = clock
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- at start --------------------------------------------------------------

    def at_start(self) -> RecoveryReport:
        """Reconcile before this process accepts anything: its row registered, the index writer running."""
        started = self.clock()  # taken before the check: a process starting after it writes only newer files
        alone = not self.membership.others_alive()
        report = RecoveryReport(temp_removed=clear_scratch(self.storage, self.engine, alone=alone))
        if not alone:
            if crashed(self.engine):
                log.info(
                    "recovery: other node processes are running; what stopped ones left is reconciled by the "
                    "holder of duty %r %g s after they stopped",
                    DUTY,
                    self.settle,
                )
            return report
        legacy_clean = _take_legacy_marker(self.storage)
        dead = crashed(self.engine)
        if dead:
            why = f"node process(es) {_names(dead)} did not stop cleanly"
        elif self._first_process() and not legacy_clean and not self._nothing_stored():
            why = "no earlier run recorded a clean stop (a data directory of an older version)"
        else:
            return report
        if not hold_duty(self.engine, DUTY, self.membership.id, self.membership.lease):
            log.info("recovery: another node process (starting too) holds duty %r: it reconciles", DUTY)
            return report
        # A dead process stored nothing after its lease ended; a newer file is a live process's (one that
        # just registered, or one whose lease lapsed while it kept working): it indexes that itself.
        cutoff = min([started, max(p.expires_at for p in dead)]) if dead else started
        try:
            self._reconcile(report, dead, cutoff, why, check_index=True)
        finally:
            release_duty(self.engine, DUTY, self.membership.id)
        return report

    def _first_process(self) -> bool:
        """Whether no node process but this one ever registered on this index (an older version's)."""
        return all(p.id == self.membership.id for p in processes(self.engine))

    def _nothing_stored(self) -> bool:
        """A new data directory and an empty index: nothing to compare."""
        if next(self.storage.iter_stored(), None) is not None:
            return False
        with self.engine.connect() as conn:
            return conn.execute(select(_i.c.id).limit(1)).first() is None

    # -- while running ----------------------------------------------------------

    def sweep(self) -> None:
        """On each heartbeat: reconcile, in a thread, processes that crashed more than ``settle`` s ago."""
        if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
            return
        if not crashed(self.engine, older_than=self._cutoff()):
            return
        self._thread = threading.Thread(target=self._sweep_thread, name="recovery", daemon=True)
        self._thread.start()

    def _sweep_thread(self) -> None:
        try:
            self.reconcile_crashed()
        except RecoveryStopped as e:
            log.info("recovery: %s; the rest is taken up again later", e)
        except Exception:
            log.exception(
                "recovery: reconciling stopped node processes failed; it is tried again at the next heartbeat"
            )

    def reconcile_crashed(self) -> RecoveryReport | None:
        """If this process gets duty "recovery": reconcile the processes that crashed before the cut-off.

        None when there was nothing to do or another process holds the duty.
        """
        cutoff = self._cutoff()
        if not crashed(self.engine, older_than=cutoff):
            return None
        if not hold_duty(self.engine, DUTY, self.membership.id, self.membership.lease):
            return None
        try:
            # Again, holding the duty: the previous holder may have reconciled them meanwhile.
            dead = crashed(self.engine, older_than=cutoff)
            if not dead:
                return None
            report = RecoveryReport()
            why = f"node process(es) {_names(dead)} stopped without a clean stop"
            self._reconcile(report, dead, cutoff, why, check_index=False)
            return report
        finally:
            release_duty(self.engine, DUTY, self.membership.id)

    def stop(self) -> None:
        """Stop a reconciliation in progress (after its current batch) and wait for it."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(60)

    def _cutoff(self) -> dt.datetime:
        return self.clock() - dt.timedelta(seconds=self.settle)

    # -- reconciling --------------------------------------------------------------

    def _reconcile(
        self, report: RecoveryReport, dead: Sequence[ProcessRow], cutoff: dt.datetime, why: str, *, check_index: bool
    ) -> None:
        """Clear ``dead``'s temp directories, adopt unindexed files older than ``cutoff``, mark ``dead`` recovered."""
        report.processes = [p.id for p in dead]
        report.full_scan = True
        log.warning("recovery: %s; comparing storage with the index", why)
        for p in dead:
            entry = self.storage.tmp_root / file_name(p.id)
            if entry.exists():
                n = self.storage.clear_temp(entry)
                report.temp_removed += n
                log.info("recovery: removed %d incomplete temporary file(s) of node process %s", n, p.id)
        self._scan_files(report, cutoff.timestamp())
        if check_index:
            self._check_index(report)
        mark_recovered(self.engine, report.processes)
        log.info(
            "recovery: checked %d file(s), indexed %d unindexed file(s), quarantined %d, left %d newer file(s) "
            "to the processes storing them (reconciled: %s)",
            report.files_checked,
            len(report.indexed),
            len(report.quarantined),
            report.too_recent,
            ", ".join(report.processes) or "a data directory of an older version",
        )

    def _scan_files(self, report: RecoveryReport, cutoff: float) -> None:
        """Files -> index, in batches, so memory stays bounded with millions of instances."""
        recorder = Recorder("keep_first", file_exists=lambda rel: (self.storage.root / rel).is_file())
        batch: list[tuple[Path, str]] = []

        def check(batch: list[tuple[Path, str]]) -> None:
            self._still_on_duty()
            with self.engine.connect() as conn:
                known = set(
                    conn.execute(select(_i.c.file_path).where(_i.c.file_path.in_([r for _p, r in batch]))).scalars()
                )
            for path, rel in batch:
                if rel in known:
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # removed meanwhile (a duplicate, retention): nothing to adopt
                    continue
                # ctime too: a job's output keeps the mtime the plugin gave it, but its rename into storage/ is new.
                if max(st.st_mtime, st.st_ctime) >= cutoff:
                    report.too_recent += 1
                    continue
                self._adopt(recorder, path, rel, report)

        for path in self.storage.iter_stored():
            report.files_checked += 1
            batch.append((path, self.storage.relative(path)))
            if len(batch) >= RECOVERY_BATCH:
                check(batch)
                batch = []
        if batch:
            check(batch)

    def _still_on_duty(self) -> None:
        if self._stop.is_set():
            raise RecoveryStopped("the node is stopping")
        if not hold_duty(self.engine, DUTY, self.membership.id, self.membership.lease):
            raise RecoveryStopped(f"another node process took duty {DUTY!r}")

    def _check_index(self, report: RecoveryReport) -> None:
        """Index -> files, streamed in id order: rows whose file is gone are reported."""
        with self.engine.connect() as conn:
            rows = conn.execution_options(yield_per=RECOVERY_BATCH).execute(
                select(_i.c.file_path, _i.c.sop_instance_uid).order_by(_i.c.id)
            )
            for rel, uid in rows:
                if not (self.storage.root / rel).is_file():
                    report.missing_count += 1
                    if len(report.missing_files) < MISSING_LISTED:
                        report.missing_files.append(uid)
        if report.missing_count:
            log.error(
                "recovery: %d indexed instance(s) have no file (first: %s); they cannot be served or forwarded",
                report.missing_count,
                ", ".join(report.missing_files[:5]),
            )

    def _adopt(self, recorder: Recorder, path: Path, rel: str, report: RecoveryReport) -> None:
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
        except FileNotFoundError:  # removed meanwhile
            return
        except Exception as e:  # unreadable: keep the bytes, out of the way
            self._quarantine(path, report, f"unreadable ({e})")
            return
        # An index failure here is not the file's fault: it propagates and stops the reconciliation
        # with the reason, leaving the file where it is.
        outcome = self.writer.call(lambda tx: recorder.record(tx, record))
        if outcome.series_id and record.sop_instance_uid.startswith(DERIVED_UID_ROOT):
            # one of the node's own outputs, stored just before a crash: not a series for the rules
            self.writer.call(lambda tx: mark_not_tracked(tx, outcome.series_id))
        if outcome.kind == "new":
            report.indexed.append(record.sop_instance_uid)
            log.warning(
                "recovery: indexed %s (%s), stored before a crash but not yet indexed", record.sop_instance_uid, rel
            )
        elif self._indexed_path(outcome.instance_id) == rel:
            log.info("recovery: %s (%s) was indexed meanwhile by another process", record.sop_instance_uid, rel)
        else:
            self._quarantine(path, report, f"{record.sop_instance_uid} is already indexed under another file")

    def _indexed_path(self, instance_id: int) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(_i.c.file_path).where(_i.c.id == instance_id)).scalar()

    def _quarantine(self, path: Path, report: RecoveryReport, why: str) -> None:
        target = self.storage.quarantine / path.name
        self.storage.quarantine.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except FileNotFoundError:  # removed meanwhile
            return
        fsync_dir(self.storage.quarantine)
        report.quarantined.append(str(target))
        log.warning("recovery: moved %s to %s: %s", path, target, why)


def clear_scratch(storage: Storage, engine: Engine, *, alone: bool) -> int:
    """Remove the temp files of node processes that are gone; returns how many files went.

    A temp directory named after a process that is not alive goes. Anything else under ``tmp/``
    (flat files of an older version, directories of processes whose row is gone) goes only when
    ``alone`` (no other process alive): it might belong to one that is. The entries are listed before
    the rows are read: a process makes its temp directory only after registering, so a directory
    listed here has a row the query sees.
    """
    try:
        entries = list(storage.tmp_root.iterdir())
    except FileNotFoundError:
        return 0
    now = utcnow()
    rows = processes(engine)
    live = {file_name(p.id) for p in rows if p.alive(now)}
    known = {file_name(p.id): p.id for p in rows}
    removed: dict[str, int] = {}
    for entry in entries:
        if entry == storage.tmp or entry.name in live:
            continue
        owner = known.get(entry.name)
        if owner is None and not alone:
            continue
        key = f"node process {owner}" if owner else "an earlier run"
        removed[key] = removed.get(key, 0) + storage.clear_temp(entry)
    for whose, n in removed.items():
        if n:
            log.info("recovery: removed %d incomplete temporary file(s) of %s", n, whose)
    return sum(removed.values())


def _take_legacy_marker(storage: Storage) -> bool:
    """Whether an older version's clean-stop marker was there; it is removed, durably, before anything is accepted."""
    marker = storage.root / LEGACY_CLEAN_MARKER
    if not marker.exists():
        return False
    marker.unlink()
    fsync_dir(storage.root)
    return True


def _names(rows: Sequence[ProcessRow]) -> str:
    return ", ".join(p.id for p in rows)
