"""Storing a job's outputs (node.derive.store) on its own: no plugin process, no node process.

Outputs are real CT slices given the node's derived UIDs (as a plugin's outputs have), written into
the job's work directory and stored with the real index writer on a migrated SQLite index. What a
user relies on: an output lands in storage byte for byte with one row that names the job that made
it and an audit entry naming the rule and plugin; the node never runs rules on its own outputs; a
job run again stores nothing twice; a failure part way leaves no file without a row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import series_files
from pydicom import dcmread
from pydicom.uid import UID
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.derive.store import OutputStore
from node.dicom.files import Rejected
from node.dicom.identity import DERIVED_UID_ROOT
from node.index.db import make_engine, migrate
from node.index.models import AuditEvent, Instance, Patient, Series, Study
from node.index.records import Recorder
from node.index.writer import IndexWriter
from node.jobs.store import NewJob, create_jobs
from node.storage import Storage

CT = "ct-head-philips-5mm"
DERIVED_SERIES = DERIVED_UID_ROOT + "7.1"


@dataclass
class Outputs:
    engine: Engine
    storage: Storage
    store: OutputStore
    job_id: int

    def write(self, n: int, attempt: int = 1) -> list[Path]:
        """``n`` outputs of the job, as its plugin writes them: one derived series, deterministic UIDs."""
        work = self.store.work_dir(self.job_id, attempt)
        files = []
        for i, source in enumerate(series_files(CT)[:n]):
            ds = dcmread(source)
            ds.SeriesInstanceUID = UID(DERIVED_SERIES)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{DERIVED_SERIES}.{i + 1}")
            out = work / f"out-{i}.dcm"
            ds.save_as(out, enforce_file_format=True)
            files.append(out)
        return files

    def rows(self) -> list[tuple[str, str, int | None]]:
        with Session(self.engine) as s:
            q = select(Instance.sop_instance_uid, Instance.file_path, Instance.job_fk).order_by(Instance.id)
            return list(s.execute(q).all())

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.storage.files.rglob("*") if p.is_file())

    def audit(self) -> list[tuple[str, int | None, str, str]]:
        with Session(self.engine) as s:
            q = select(AuditEvent.sop_instance_uid, AuditEvent.job_id, AuditEvent.rule, AuditEvent.detail).where(
                AuditEvent.kind == "output_produced"
            )
            return list(s.execute(q.order_by(AuditEvent.id)).all())


@pytest.fixture
def outputs(tmp_path: Path) -> Iterator[Outputs]:
    storage = Storage(tmp_path / "data")
    storage.prepare()
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    migrate(engine)
    with Session(engine) as s:  # the received series the job was made for
        s.add(
            Series(
                series_instance_uid="1.2.826.0.1.3680043.99.5",
                state="triggered",
                study=Study(study_instance_uid="1.2.826.0.1.3680043.99.4", patient=Patient()),
            )
        )
        s.commit()
    with engine.begin() as conn:
        [job_id] = create_jobs(conn, 1, 1, [NewJob("seg-ct", 0, "plugin", {})])
    writer = IndexWriter(engine)
    writer.start()
    recorder = Recorder("keep_first", file_exists=lambda rel: storage.absolute(rel).is_file())
    try:
        yield Outputs(engine, storage, OutputStore(storage, writer, recorder, "NODE"), job_id)
    finally:
        writer.stop()
        engine.dispose()


def test_outputs_are_stored_with_their_job_and_not_tracked_by_the_rules(outputs: Outputs) -> None:
    files = outputs.write(2)
    written = [f.read_bytes() for f in files]

    stored = outputs.store.store(files, outputs.job_id, rule="seg-ct", software="threshold-seg 1.0", notes=["a", ""])

    assert [(o.sop_instance_uid, o.series_instance_uid, o.outcome) for o in stored] == [
        (f"{DERIVED_SERIES}.1", DERIVED_SERIES, "new"),
        (f"{DERIVED_SERIES}.2", DERIVED_SERIES, "new"),
    ]
    assert [o.path.read_bytes() for o in stored] == written  # byte for byte
    assert not any(f.exists() for f in files)  # moved out of the work directory
    assert outputs.stored_files() == sorted(o.path for o in stored)
    rows = outputs.rows()
    assert [(uid, outputs.storage.absolute(path), job) for uid, path, job in rows] == [
        (o.sop_instance_uid, o.path, outputs.job_id) for o in stored
    ]  # lineage: each output names its job
    assert outputs.audit() == [
        (f"{DERIVED_SERIES}.1", outputs.job_id, "seg-ct", "threshold-seg 1.0; a"),
        (f"{DERIVED_SERIES}.2", outputs.job_id, "seg-ct", "threshold-seg 1.0"),
    ]
    with Session(outputs.engine) as s:
        state = s.scalar(select(Series.state).where(Series.series_instance_uid == DERIVED_SERIES))
    assert state == "triggered"  # no rule ever runs on the node's own outputs


def test_a_job_run_again_stores_nothing_twice(outputs: Outputs) -> None:
    first = outputs.store.store(outputs.write(2), outputs.job_id, rule="seg-ct")
    kept = [o.path.read_bytes() for o in first]

    again = outputs.store.store(outputs.write(2, attempt=2), outputs.job_id, rule="seg-ct")

    assert [o.outcome for o in again] == ["duplicate", "duplicate"]
    assert [outputs.storage.absolute(path) for _, path, _ in outputs.rows()] == [o.path for o in first]
    assert outputs.stored_files() == sorted(o.path for o in first)  # the second copies are not left behind
    assert [o.path.read_bytes() for o in first] == kept
    assert len(outputs.audit()) == 2  # audited once, when first stored


def test_an_unreadable_output_leaves_no_file_and_no_row(outputs: Outputs) -> None:
    files = outputs.write(2)
    files[1].write_bytes(files[1].read_bytes()[:200])  # a plugin that died while writing its second file

    with pytest.raises(Rejected):
        outputs.store.store(files, outputs.job_id, rule="seg-ct")

    assert outputs.stored_files() == []  # the first output, already placed, is removed again
    assert outputs.rows() == [] and outputs.audit() == []
