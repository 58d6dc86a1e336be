"""Writing one received instance into the index: the rows and the rules for duplicates."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from node.index.models import Instance, Patient, Series, Study

DuplicatePolicy = Literal["keep_first", "overwrite"]


@dataclass(slots=True)
class InstanceRecord:
    """Everything the index keeps about one instance, by information-model level."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    received_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    @property
    def sop_instance_uid(self) -> str:
        return str(self.instance["sop_instance_uid"])


@dataclass(slots=True)
class RecordOutcome:
    #: "new", "duplicate" (kept the first, nothing written) or "replaced".
    kind: Literal["new", "duplicate", "replaced"]
    instance_id: int
    #: For "replaced": the file the old row pointed to, to delete after commit.
    old_file_path: str | None = None


def existing_file(session: Session, sop_instance_uid: str) -> str | None:
    return session.execute(
        select(Instance.file_path).where(Instance.sop_instance_uid == sop_instance_uid)
    ).scalar_one_or_none()


class Recorder:
    """Upserts instances, caching parent row ids.

    Used only from the index writer thread, so the cache needs no lock. The
    cache is dropped whenever a transaction fails, in case it holds ids of
    rows that were rolled back.
    """

    def __init__(self, policy: DuplicatePolicy) -> None:
        self.policy = policy
        self._patients: dict[tuple[str, str], int] = {}
        self._studies: dict[str, int] = {}
        self._series: dict[str, int] = {}

    def forget(self) -> None:
        self._patients.clear()
        self._studies.clear()
        self._series.clear()

    def _patient_id(self, s: Session, values: dict[str, Any]) -> int:
        key = (values["patient_id"], values["issuer_of_patient_id"])
        pk = self._patients.get(key)
        if pk is None:
            pk = s.execute(
                select(Patient.id).where(
                    Patient.patient_id == key[0], Patient.issuer_of_patient_id == key[1]
                )
            ).scalar_one_or_none()
            if pk is None:
                pk = s.execute(insert(Patient).values(**values).returning(Patient.id)).scalar_one()
            self._patients[key] = pk
        return pk

    def _study_id(self, s: Session, values: dict[str, Any], patient_fk: int) -> int:
        uid = values["study_instance_uid"]
        pk = self._studies.get(uid)
        if pk is None:
            pk = s.execute(select(Study.id).where(Study.study_instance_uid == uid)).scalar_one_or_none()
            if pk is None:
                pk = s.execute(
                    insert(Study).values(patient_fk=patient_fk, **values).returning(Study.id)
                ).scalar_one()
            self._studies[uid] = pk
        return pk

    def _series_id(self, s: Session, values: dict[str, Any], study_fk: int, now: dt.datetime) -> int:
        uid = values["series_instance_uid"]
        pk = self._series.get(uid)
        if pk is None:
            pk = s.execute(select(Series.id).where(Series.series_instance_uid == uid)).scalar_one_or_none()
            if pk is None:
                pk = s.execute(
                    insert(Series)
                    .values(study_fk=study_fk, first_received_at=now, last_received_at=now, **values)
                    .returning(Series.id)
                ).scalar_one()
            self._series[uid] = pk
        return pk

    def record(self, s: Session, rec: InstanceRecord) -> RecordOutcome:
        now = rec.received_at
        patient_fk = self._patient_id(s, rec.patient)
        study_fk = self._study_id(s, rec.study, patient_fk)
        series_fk = self._series_id(s, rec.series, study_fk, now)
        row = s.execute(
            select(Instance.id, Instance.file_path, Instance.series_fk).where(
                Instance.sop_instance_uid == rec.sop_instance_uid
            )
        ).one_or_none()
        values = dict(rec.instance, series_fk=series_fk, received_at=now)
        if row is None:
            pk = s.execute(insert(Instance).values(**values).returning(Instance.id)).scalar_one()
            s.execute(
                update(Series)
                .where(Series.id == series_fk)
                .values(instance_count=Series.instance_count + 1, last_received_at=now)
            )
            return RecordOutcome("new", pk)
        if self.policy == "keep_first":
            return RecordOutcome("duplicate", row.id)
        s.execute(update(Instance).where(Instance.id == row.id).values(**values))
        if row.series_fk != series_fk:  # the same SOP Instance UID moved to another series
            s.execute(
                update(Series).where(Series.id == row.series_fk).values(instance_count=Series.instance_count - 1)
            )
            s.execute(update(Series).where(Series.id == series_fk).values(instance_count=Series.instance_count + 1))
        s.execute(update(Series).where(Series.id == series_fk).values(last_received_at=now))
        return RecordOutcome("replaced", row.id, old_file_path=row.file_path)
