"""Retention and study rules (node.storage.retention): a study whose study rule fired can still be deleted.

A study rule's firing (a study_trigger row) names its study and its primary input series, and its jobs
name the firing; once the study is old and nothing runs or waits for delivery, retention deletes its
series, study and patient rows with it (on SQLite and PostgreSQL, both enforcing the foreign keys).
While the study rule's job has not finished, every series of the study stays: the job reads its other
inputs too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.rows import stored_series
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from node.config import Config
from node.index.db import make_engine, migrate
from node.index.models import Job, Patient, Series, Study, StudyTrigger
from node.jobs.store import NewJob, create_jobs
from node.storage import Storage
from node.storage.retention import Retention

_job = Job.__table__


@pytest.fixture
def fired(any_index_url: str, tmp_path: Path) -> Iterator[tuple[Engine, Storage, int]]:
    """A study of two old series (ct, pet) whose study rule fired with ct as the primary input: one job."""
    engine = make_engine(any_index_url)
    migrate(engine)
    storage = Storage(tmp_path / "data")
    with Session(engine) as s:
        study = Study(study_instance_uid="1.7.1", patient=Patient(patient_id="P7"))
        ct, pet = stored_series(s, study, "1.7.1.1", storage), stored_series(s, study, "1.7.1.2", storage)
        s.flush()
        inputs = {
            n: {"series_id": x.id, "series_uid": x.series_instance_uid, "revision": 1}
            for n, x in [("ct", ct), ("pet", pet)]
        }
        trigger = StudyTrigger(
            study_fk=study.id,
            rule="pet-ct",
            revision=1,
            inputs=json.dumps({"primary": "ct", "inputs": inputs}),
            inputs_key="k" * 64,
            primary_series_fk=ct.id,
            reason="every input stable",
        )
        s.add(trigger)
        s.commit()
        ct_id, trigger_id = ct.id, trigger.id
    with engine.begin() as conn:
        [job] = create_jobs(conn, ct_id, 1, [NewJob("pet-ct", 0, "plugin", {"type": "plugin", "plugin": "p"})])
        conn.execute(update(_job).where(_job.c.id == job).values(study_trigger_fk=trigger_id))
    yield engine, storage, job
    engine.dispose()


def _count(engine: Engine, model: type) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def test_a_study_whose_study_rule_fired_is_deleted_with_its_rows_once_its_job_ended(
    fired: tuple[Engine, Storage, int], tmp_path: Path
) -> None:
    engine, storage, job = fired
    cfg = Config.model_validate(
        {"retention": {"sources": {"max_age_days": 1}}, "node": {"data_dir": str(tmp_path / "data")}}
    )
    retention = Retention(cfg, engine, storage, owner="test")

    report = retention.run_once()  # the study rule's job is pending: it will read both series
    assert report.series == 0 and report.blocked == {"job": 2} and report.errors == []

    with engine.begin() as conn:
        conn.execute(update(_job).where(_job.c.id == job).values(state="succeeded"))
    report = retention.run_once()
    assert report.errors == []
    assert report.deleted["sources"].series == 2 and sorted(report.series_uids) == ["1.7.1.1", "1.7.1.2"]
    assert (report.series_rows_removed, report.studies_removed, report.patients_removed) == (2, 1, 1)
    for model in (Series, Study, Patient, StudyTrigger, Job):
        assert _count(engine, model) == 0, model.__name__
    assert not storage.absolute("storage/1.7.1.1/1.dcm").exists()
