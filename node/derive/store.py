"""Storing a job's outputs like received instances: fsync, rename into storage, index, link to the job.

The outputs' UIDs are deterministic per job (see :mod:`node.derive.common`),
so a job run again after a crash stores nothing twice: the index already
holds those SOP Instance UIDs and keeps the first copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, update

from node import audit
from node.dicom.files import file_checksum, read_file_header
from node.index.models import Instance
from node.index.records import INDEX_WAIT, InstanceRecord, Recorder, RecordOutcome, mark_not_tracked, to_record
from node.index.writer import IndexWriter, Tx
from node.storage import Storage
from node.storage.layout import fsync_dir

_i = Instance.__table__
_LINK_JOB = update(_i).where(_i.c.id == bindparam("pk")).values(job_fk=bindparam("job"))


@dataclass
class StoredOutput:
    sop_instance_uid: str
    series_instance_uid: str
    path: Path
    #: "new", or "duplicate" when an earlier run of the same job stored it already (that copy is kept).
    outcome: str


class OutputStore:
    def __init__(self, storage: Storage, writer: IndexWriter, recorder: Recorder, ae_title: str) -> None:
        self.storage = storage
        self.writer = writer
        self.recorder = recorder
        self.ae_title = ae_title

    def work_dir(self, job_id: int, attempt: int) -> Path:
        """A fresh directory for a job run's files, in this process's temp directory (cleared once it is gone)."""
        d = self.storage.tmp / f"job-{job_id}-{attempt}"
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        return d

    def store(
        self, files: list[Path], job_id: int, *, rule: str = "", software: str = "", notes: list[str] | None = None
    ) -> list[StoredOutput]:
        """Place and index ``files`` (written by the plugin process) in one index transaction.

        On any failure, the files placed so far are removed again: nothing is left without a row.
        Each new output is audited (``output_produced``: the job, its ``rule``, the plugin ``software``
        that made it, e.g. "threshold-seg 1.0", and the file's entry in ``notes``, if any) in the same
        transaction.
        """
        placed: list[tuple[Path, InstanceRecord, str, str]] = []
        try:
            return self._store(files, job_id, placed, rule, software, notes or [""] * len(files))
        except BaseException:
            for p, *_ in placed:
                if p.exists():
                    self.storage.remove(p)
            raise

    def _store(
        self,
        files: list[Path],
        job_id: int,
        placed: list[tuple[Path, InstanceRecord, str, str]],
        rule: str,
        software: str,
        notes: list[str],
    ) -> list[StoredOutput]:
        for f in files:
            header, size, _ = read_file_header(f)
            final = self.storage.path_for(header.text("SeriesInstanceUID"), header.text("SOPInstanceUID"))
            record = to_record(
                header,
                file_path=self.storage.relative(final),
                file_size=size,
                checksum=file_checksum(f),
                calling_ae=self.ae_title,
                called_ae=self.ae_title,
                association_id=f"job-{job_id}",
            )
            with open(f, "rb") as fp:
                os.fdatasync(fp.fileno())
            self.storage.place(f, final)
            placed.append((final, record, header.text("SOPInstanceUID"), header.text("SeriesInstanceUID")))
        for d in {p.parent for p, *_ in placed}:
            fsync_dir(d)

        def work(tx: Tx) -> list[RecordOutcome]:
            outcomes = []
            for (_, record, sop, series), note in zip(placed, notes, strict=True):
                outcome = self.recorder.record(tx, record)
                tx.execute(tx.prepare("link_job", _LINK_JOB), {"pk": outcome.instance_id, "job": job_id})
                if outcome.series_id:
                    mark_not_tracked(tx, outcome.series_id)
                if outcome.kind != "duplicate":  # a duplicate was audited when an earlier run stored it
                    audit.record_tx(
                        tx,
                        "output_produced",
                        actor="node",
                        job_id=job_id,
                        rule=rule,
                        study_uid=record.study["study_instance_uid"],
                        series_uid=series,
                        sop_instance_uid=sop,
                        detail=software
                        + (f"; {note}" if note else "")
                        + (" (replaced the stored copy)" if outcome.kind == "replaced" else ""),
                    )
                outcomes.append(outcome)
            return outcomes

        future = self.writer.submit(work)
        try:
            outcomes = future.result(timeout=INDEX_WAIT)
        except TimeoutError:
            if not future.cancel():  # already being committed: its result is moments away
                outcomes = future.result()
            else:
                raise
        out = []
        for (p, _, sop, series), o in zip(placed, outcomes, strict=True):
            if o.kind == "duplicate" and o.old_file_path != self.storage.relative(p):
                self.storage.remove(p)  # stored by an earlier run of this job: keep that copy
            elif o.kind == "replaced" and o.old_file_path and o.old_file_path != self.storage.relative(p):
                old = self.storage.absolute(o.old_file_path)  # duplicates = "overwrite": the earlier copy goes
                if old.is_file():
                    self.storage.remove(old)
            out.append(StoredOutput(sop, series, p, o.kind))
        placed.clear()  # committed: nothing to undo
        return out
