"""Retention and retrieved priors (node.storage.retention, node.qr.priors): a kind of their own, kept while needed.

A series of a study that a job retrieved as a prior (a prior_fetch row names the study) is counted as
``priors`` (``[retention] priors``), not as a source; while the job that asked for it is pending or
running, retention keeps it (the job will read it), and once the job has ended it may go.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.rows import stored_series
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from node.config import Config
from node.index.db import make_engine, migrate
from node.index.models import Job, Patient, PriorFetch, Study
from node.jobs.store import NewJob, create_jobs
from node.storage import Storage
from node.storage.retention import Retention, protected_series


@pytest.fixture
def index(any_index_url: str, tmp_path: Path) -> Iterator[tuple[Engine, Storage, dict[str, int]]]:
    engine = make_engine(any_index_url)
    migrate(engine)
    storage = Storage(tmp_path / "data")
    with Session(engine) as s:
        patient = Patient(patient_id="P1")
        new = stored_series(s, Study(study_instance_uid="1.9.1", patient=patient), "1.9.1.1", storage)
        prior = stored_series(s, Study(study_instance_uid="1.9.0", patient=patient), "1.9.0.1", storage)
        s.commit()
        ids = {"new": new.id, "prior": prior.id}
    with engine.begin() as conn:
        [job] = create_jobs(conn, ids["new"], 1, [NewJob("follow-up", 0, "plugin", {"type": "plugin", "plugin": "p"})])
        conn.execute(
            PriorFetch.__table__.insert().values(job_fk=job, source="pacs", study_uid="1.9.0", state="retrieved")
        )
    ids["job"] = job
    yield engine, storage, ids
    engine.dispose()


def test_a_prior_is_its_own_kind_and_kept_while_its_job_is_unfinished(
    index: tuple[Engine, Storage, dict[str, int]], tmp_path: Path
) -> None:
    engine, storage, ids = index
    cfg = Config.model_validate(
        {"retention": {"priors": {"max_age_days": 1}}, "node": {"data_dir": str(tmp_path / "data")}}
    )
    with engine.connect() as conn:
        assert protected_series(conn)[ids["prior"]] == "job"  # the pending job will read it
    retention = Retention(cfg, engine, storage, owner="test")
    report = retention.run_once()
    assert report.deleted["priors"].series == 0 and report.blocked == {"job": 1}

    with engine.begin() as conn:
        conn.execute(update(Job.__table__).where(Job.__table__.c.id == ids["job"]).values(state="succeeded"))
    report = retention.run_once()
    assert report.deleted["priors"].series == 1 and report.deleted["priors"].instances == 1
    assert report.deleted["sources"].series == 0  # sources have no max age here: the new study stays
    assert report.series_uids == ["1.9.0.1"]
    assert not storage.absolute("storage/1.9.0.1/1.dcm").exists() and storage.absolute("storage/1.9.1.1/1.dcm").exists()
