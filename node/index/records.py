"""Writing one received instance into the index: the rows and the rules for duplicates."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import ColumnClause, DateTime, Insert, Table, bindparam, case, literal_column, select

from node.dicom.files import Header
from node.index.db import insert_or_skip
from node.index.models import Instance, Patient, Series, Study
from node.index.states import SeriesState
from node.index.writer import Conflict, Tx

DuplicatePolicy = Literal["keep_first", "overwrite"]

#: Seconds a writer of instances (receiving, a job storing its outputs) waits for the index writer to
#: record them before it gives up (receiving then answers "out of resources").
INDEX_WAIT = 60.0


@dataclass(slots=True)
class InstanceRecord:
    """Everything the index keeps about one instance, by information-model level."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    received_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def sop_instance_uid(self) -> str:
        return str(self.instance["sop_instance_uid"])


@dataclass(slots=True)
class RecordOutcome:
    #: "new", "duplicate" (kept the first, nothing written) or "replaced".
    kind: Literal["new", "duplicate", "replaced"]
    instance_id: int
    #: For "replaced": the file the old row pointed to, to delete after commit. For "duplicate": the file
    #: the row keeps (the caller's new copy goes, unless it is that very file: recovery by another process
    #: may have indexed it meanwhile).
    old_file_path: str | None = None
    #: For "new" and "replaced": the series row, its open revision and how many
    #: instances that revision holds now (for the series tracker).
    series_id: int = 0
    revision: int = 0
    revision_instances: int = 0


_patient = Patient.__table__
_study = Study.__table__
_series = Series.__table__
_instance = Instance.__table__


def _upserts(table: Table, *identity: str) -> dict[str, Insert]:
    """``INSERT ... ON CONFLICT (identity) DO NOTHING RETURNING id``, per dialect.

    Why: several node processes may insert the same patient, study, series or instance at the same
    moment. With a plain INSERT the slower one fails on the unique constraint; with this it gets no
    row back, and the caller reads the winner's row (PostgreSQL makes the statement wait for the
    other transaction, so what it finds afterwards is committed).
    """
    conflict = [table.c[name] for name in identity]
    return {name: insert_or_skip(table, name, *conflict).returning(table.c.id) for name in ("sqlite", "postgresql")}


def _upsert(tx: Tx, statements: dict[str, Insert]) -> Insert:
    try:
        return statements[tx.dialect.name]
    except KeyError:
        raise RuntimeError(f"the index needs SQLite or PostgreSQL, not {tx.dialect.name}") from None


# Statements are built once with bound parameters: SQLAlchemy then reuses the
# compiled form, which is what keeps a row under a millisecond of Python.
_SEL_PATIENT = select(_patient.c.id).where(
    _patient.c.patient_id == bindparam("patient_id"),
    _patient.c.issuer_of_patient_id == bindparam("issuer_of_patient_id"),
    _patient.c.patient_name == bindparam("patient_name"),
    _patient.c.birth_date == bindparam("birth_date"),
)
_UPS_PATIENT = _upserts(_patient, "patient_id", "issuer_of_patient_id", "patient_name", "birth_date")
_SEL_STUDY = select(_study.c.id).where(_study.c.study_instance_uid == bindparam("uid"))
_UPS_STUDY = _upserts(_study, "study_instance_uid")
_SEL_SERIES = select(_series.c.id).where(_series.c.series_instance_uid == bindparam("uid"))
_UPS_SERIES = _upserts(_series, "series_instance_uid")
_SEL_INSTANCE = select(_instance.c.id, _instance.c.file_path, _instance.c.series_fk).where(
    _instance.c.sop_instance_uid == bindparam("uid")
)
_UPS_INSTANCE = _upserts(_instance, "sop_instance_uid")
# Only the row as this transaction read it: another process may have replaced it meanwhile (its file would be lost).
_UPD_INSTANCE = _instance.update().where(
    _instance.c.id == bindparam("pk"), _instance.c.file_path == bindparam("old_file_path")
)
# An arrival keeps a receiving series' revision open, or opens the next
# revision of a stable/triggered one. Every right-hand side sees the row as
# it was before the UPDATE (SQL semantics, SQLite and PostgreSQL alike).
# (Literals inline, not as bind parameters: Prepared binds only named parameters.)
_RECEIVING: ColumnClause[str] = literal_column(f"'{SeriesState.RECEIVING}'")
_ONE: ColumnClause[int] = literal_column("1")
_receiving = _series.c.state == _RECEIVING
# Typed, so that SQLite gets the same text format as every other time column.
_NOW = bindparam("now", type_=DateTime(timezone=True))
_SERIES_ADD = (
    _series.update()
    .where(_series.c.id == bindparam("pk"))
    .values(
        instance_count=_series.c.instance_count + bindparam("delta"),
        last_received_at=_NOW,
        revision=case((_receiving, _series.c.revision), else_=_series.c.revision + _ONE),
        revision_instances=case((_receiving, _series.c.revision_instances + bindparam("delta")), else_=_ONE),
        revision_started_at=case((_receiving, _series.c.revision_started_at), else_=_NOW),
        state=_RECEIVING,
    )
    .returning(_series.c.revision, _series.c.revision_instances)
)
_STUDY_RELINK = _study.update().where(_study.c.id == bindparam("pk")).values(patient_fk=bindparam("patient_fk"))
_SERIES_SUB = (
    _series.update().where(_series.c.id == bindparam("pk")).values(instance_count=_series.c.instance_count - 1)
)
# The node's own outputs are not "received series": rules do not run on them (no loops of derived objects).
_NOT_TRACKED = (
    _series.update().where(_series.c.id == bindparam("pk")).values(state=literal_column(f"'{SeriesState.TRIGGERED}'"))
)


class Recorder:
    """Upserts instances, caching parent row ids.

    Used only in the index writer's work items (its thread), so the cache
    needs no lock. Whenever anything was rolled back since the ids were cached
    (the transaction's epoch changed), the cache is dropped: it may hold ids
    of rows never committed. Every recorder sharing the writer (receiving,
    outputs, crash recovery) sees that, without being told.
    Other node processes may record the same rows at the same moment: parent
    rows are upserted, and an instance row that another process wrote since
    this transaction read it raises :class:`~node.index.writer.Conflict`.
    """

    def __init__(self, policy: DuplicatePolicy, file_exists: Callable[[str], bool] | None = None) -> None:
        """``file_exists(relative_path)`` lets keep_first tell a true duplicate from a lost file."""
        self.policy = policy
        self.file_exists = file_exists
        self._patients: dict[tuple[str, str, str, str], int] = {}
        self._studies: dict[str, int] = {}
        self._series: dict[str, int] = {}
        #: The writer transaction epoch the cached ids were read in (node.index.writer.Tx.epoch).
        self._epoch = 0

    def forget(self) -> None:
        self._patients.clear()
        self._studies.clear()
        self._series.clear()

    @staticmethod
    def _parent(
        tx: Tx,
        cache: dict[Any, int],
        key: Any,
        name: str,
        select_stmt: Any,
        select_params: dict[str, Any],
        upserts: dict[str, Insert],
        values: Callable[[], dict[str, Any]],
    ) -> int:
        """The id of a patient/study/series row: from the cache, the table, or a new row.

        The SELECT comes first because on a cache miss the row usually exists already (a new
        series of a known study, another process's series); the upsert then only runs for a new
        row, and a second SELECT only when another process inserted it since the first.
        """
        pk = cache.get(key)
        if pk is None:
            select_p = tx.prepare("sel_" + name, select_stmt)
            pk = tx.scalar(select_p, select_params)
            if pk is None:
                row = values()
                pk = tx.scalar(tx.prepare("ups_" + name, _upsert(tx, upserts), list(row)), row)
                if pk is None:  # inserted by another process since our SELECT: take its row
                    pk = tx.scalar(select_p, select_params)
                if pk is None:  # ... which is gone again (removed by retention)
                    raise Conflict(f"the {name} row {key} changed while this transaction read it")
            cache[key] = int(pk)
        return int(pk)

    def record(self, tx: Tx, rec: InstanceRecord, *, _again: bool = False) -> RecordOutcome:
        if tx.epoch != self._epoch:  # something was rolled back since these ids were cached
            self.forget()
            self._epoch = tx.epoch
        now = rec.received_at
        p = rec.patient
        patient_key = (p["patient_id"], p["issuer_of_patient_id"], p["patient_name"], p["birth_date"])
        if rec.series["series_instance_uid"] not in self._series:
            # A series new to this cache: its study and patient rows may have been removed since their ids
            # were cached (retention, perhaps run from another process); look them up again, once per series.
            self._studies.pop(rec.study["study_instance_uid"], None)
            self._patients.pop(patient_key, None)
        patient_fk = self._parent(
            tx,
            self._patients,
            patient_key,
            "patient",
            _SEL_PATIENT,
            p,
            _UPS_PATIENT,
            lambda: dict(p, created_at=now),
        )
        uid = rec.study["study_instance_uid"]
        study_fk = self._parent(
            tx,
            self._studies,
            uid,
            "study",
            _SEL_STUDY,
            {"uid": uid},
            _UPS_STUDY,
            lambda: dict(rec.study, patient_fk=patient_fk, created_at=now),
        )
        uid = rec.series["series_instance_uid"]
        series_fk = self._parent(
            tx,
            self._series,
            uid,
            "series",
            _SEL_SERIES,
            {"uid": uid},
            _UPS_SERIES,
            lambda: dict(
                rec.series,
                study_fk=study_fk,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
                state=SeriesState.RECEIVING,
                revision=1,
                revision_instances=0,
                revision_started_at=now,
            ),
        )
        row = tx.row(tx.prepare("sel_instance", _SEL_INSTANCE), {"uid": rec.sop_instance_uid})
        if row is not None and self.policy == "keep_first" and (self.file_exists is None or self.file_exists(row[1])):
            return RecordOutcome("duplicate", row[0], old_file_path=row[1])
        # The series row first: it says which revision the instance belongs to.
        delta = 1 if row is None or row[2] != series_fk else 0
        added = tx.row(tx.prepare("series_add", _SERIES_ADD), {"pk": series_fk, "delta": delta, "now": now})
        if added is None and not _again:  # the cached series row was removed meanwhile (retention)
            self.forget()
            return self.record(tx, rec, _again=True)
        revision, revision_instances = added
        values = dict(rec.instance, series_fk=series_fk, received_at=now, revision=revision)
        tracked = {"series_id": series_fk, "revision": revision, "revision_instances": revision_instances}
        if row is None:
            pk = tx.scalar(tx.prepare("ups_instance", _upsert(tx, _UPS_INSTANCE), list(values)), values)
            if pk is None:
                # Another process recorded this SOP Instance UID since our SELECT (the series row above
                # already counted it): the writer runs the transaction again, which finds that row and
                # ends as a duplicate or a replacement.
                raise Conflict(f"{rec.sop_instance_uid} was recorded by another process meanwhile")
            return RecordOutcome("new", pk, **tracked)
        # overwrite, or keep_first whose first copy is gone: the new copy replaces the row
        old_id, old_path, old_series = row
        keys = list(values)
        values["pk"], values["old_file_path"] = old_id, old_path
        if tx.execute(tx.prepare("upd_instance", _UPD_INSTANCE, keys), values).rowcount != 1:
            # Replaced (or removed) by another process since our SELECT: run again, or its file would be lost.
            raise Conflict(f"{rec.sop_instance_uid} was changed by another process meanwhile")
        # The newest copy wins: a re-send with corrected demographics moves the study to that patient.
        tx.execute(tx.prepare("study_relink", _STUDY_RELINK), {"pk": study_fk, "patient_fk": patient_fk})
        if old_series != series_fk:  # the same SOP Instance UID moved from another series
            tx.execute(tx.prepare("series_sub", _SERIES_SUB), {"pk": old_series})
        return RecordOutcome("replaced", old_id, old_file_path=old_path, **tracked)


def mark_not_tracked(tx: Tx, series_id: int) -> None:
    """The node's own outputs are not received series: no rule runs on them (no loops of derived objects)."""
    tx.execute(tx.prepare("not_tracked", _NOT_TRACKED), {"pk": series_id})


def to_record(
    header: Header,
    *,
    file_path: str,
    file_size: int,
    checksum: str,
    calling_ae: str = "",
    called_ae: str = "",
    peer_address: str = "",
    association_id: str = "",
) -> InstanceRecord:
    """The index rows of one checked data set (received, recovered or made by the node)."""
    t, i, f = header.text, header.int, header.float
    return InstanceRecord(
        patient={
            "patient_id": t("PatientID", 128),
            "issuer_of_patient_id": t("IssuerOfPatientID", 128),
            "patient_name": t("PatientName", 512),
            "birth_date": t("PatientBirthDate", 16),
            "sex": t("PatientSex", 16),
        },
        study={
            "study_instance_uid": t("StudyInstanceUID", 128),
            "study_date": t("StudyDate", 16),
            "study_time": t("StudyTime", 32),
            "accession_number": t("AccessionNumber", 64),
            "study_id": t("StudyID", 64),
            "study_description": t("StudyDescription", 512),
            "referring_physician_name": t("ReferringPhysicianName", 512),
        },
        series={
            "series_instance_uid": t("SeriesInstanceUID", 128),
            "modality": t("Modality", 16),
            "series_number": i("SeriesNumber"),
            "series_description": t("SeriesDescription", 512),
            "body_part_examined": t("BodyPartExamined", 64),
            "protocol_name": t("ProtocolName", 512),
            "series_date": t("SeriesDate", 16),
            "series_time": t("SeriesTime", 32),
            "manufacturer": t("Manufacturer", 128),
            "station_name": t("StationName", 64),
            "frame_of_reference_uid": t("FrameOfReferenceUID", 128),
        },
        instance={
            "sop_instance_uid": t("SOPInstanceUID", 128),
            "sop_class_uid": t("SOPClassUID", 128),
            "transfer_syntax_uid": str(header.transfer_syntax),
            "instance_number": i("InstanceNumber"),
            "acquisition_number": i("AcquisitionNumber"),
            "image_type": t("ImageType", 256),
            "rows": i("Rows"),
            "columns": i("Columns"),
            "number_of_frames": i("NumberOfFrames"),
            "bits_allocated": i("BitsAllocated"),
            "photometric_interpretation": t("PhotometricInterpretation", 32),
            "image_position_patient": t("ImagePositionPatient", 256),
            "image_orientation_patient": t("ImageOrientationPatient", 512),
            "pixel_spacing": t("PixelSpacing", 128),
            "slice_thickness": f("SliceThickness"),
            "slice_location": f("SliceLocation"),
            "file_path": file_path,
            "file_size": file_size,
            "checksum": checksum,
            "calling_ae": calling_ae[:16],
            "called_ae": called_ae[:16],
            "peer_address": peer_address[:64],
            "association_id": association_id,
        },
    )
