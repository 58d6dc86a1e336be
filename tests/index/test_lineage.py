"""dicom-node lineage: where an object came from and where it went, read from the index alone.

A small migrated index: a CT series (two instances, one revision that matched a rule), a plugin job that
made a SEG (delivered to pacs) and a forward job whose deliveries failed; and a series no rule touched.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Connection, Engine, Table

from node.index.db import make_engine, migrate
from node.index.lineage import NotFound, lineage
from node.index.models import Delivery, Instance, Job, Patient, Series, SeriesRevision, Study

CT, SEG = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4"
SOURCE, OUTPUT, QUIET = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.20", "1.2.826.0.1.3680043.8.498.30"
AT = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _table(model: type) -> Table:
    return model.__table__  # type: ignore[attr-defined, no-any-return]


def _series(conn: Connection, id: int, uid: str, modality: str, description: str, count: int) -> None:
    conn.execute(
        _table(Series)
        .insert()
        .values(
            id=id,
            series_instance_uid=uid,
            study_fk=1,
            modality=modality,
            series_description=description,
            instance_count=count,
        )
    )


def _instance(conn: Connection, id: int, uid: str, series: int, sop_class: str, job: int | None = None) -> None:
    conn.execute(
        _table(Instance)
        .insert()
        .values(
            id=id,
            sop_instance_uid=uid,
            series_fk=series,
            sop_class_uid=sop_class,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            file_path=f"storage/{id}.dcm",
            file_size=100,
            checksum="0" * 64,
            job_fk=job,
        )
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    root = tmp_path_factory.mktemp("lineage")
    engine = make_engine(f"sqlite:///{root / 'index.sqlite'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(_table(Patient).insert().values(id=1, patient_id="P1", patient_name="LINEAGE"))
        conn.execute(
            _table(Study).insert().values(id=1, study_instance_uid="1.2.826.0.1.3680043.8.498.1", patient_fk=1)
        )
        _series(conn, 1, SOURCE, "CT", "head", 2)
        _series(conn, 2, OUTPUT, "SEG", "threshold", 1)
        _series(conn, 3, QUIET, "MR", "knee", 1)
        conn.execute(
            _table(SeriesRevision)
            .insert()
            .values(
                series_fk=1,
                revision=1,
                instance_count=2,
                started_at=AT,
                last_received_at=AT,
                stable_at=AT,
                stable_reason="quiet for 30 s",
                matched_rules="ct-seg",
            )
        )
        common = {"series_fk": 1, "revision": 1, "rule": "ct-seg", "action": "{}", "finished_at": AT}
        conn.execute(
            _table(Job)
            .insert()
            .values(
                id=1, action_index=0, kind="plugin", software="threshold-seg 1.0", state="succeeded", result="1 SEG"
            )
            .values(**common)
        )
        conn.execute(
            _table(Job)
            .insert()
            .values(id=2, action_index=1, kind="forward", state="succeeded", result="queued 2")
            .values(**common)
        )
        _instance(conn, 1, f"{SOURCE}.1", 1, CT)
        _instance(conn, 2, f"{SOURCE}.2", 1, CT)
        _instance(conn, 3, f"{OUTPUT}.1", 2, SEG, job=1)
        _instance(conn, 4, f"{QUIET}.1", 3, CT)
        deliveries = [
            {"instance_fk": 3, "series_fk": 2, "job_fk": None, "state": "delivered", "delivered_at": AT},
            {"instance_fk": 1, "series_fk": 1, "job_fk": 2, "state": "failed", "last_error": "0xA700 out of resources"},
            {"instance_fk": 2, "series_fk": 1, "job_fk": 2, "state": "failed", "last_error": "0xA700 out of resources"},
        ]
        for n, d in enumerate(deliveries):
            conn.execute(_table(Delivery).insert().values(destination="pacs", sop_instance_uid=f"uid-{n}", **d))
    return engine


def test_a_source_series_shows_its_revisions_jobs_outputs_and_deliveries(engine: Engine) -> None:
    assert lineage(engine, SOURCE) == [
        f'source series {SOURCE} (CT "head", 2 instances)',
        "  revision 1: 2 instances, stable 2026-01-02 03:04:05 UTC (quiet for 30 s); ct-seg",
        "  job #1 revision 1 rule ct-seg action 0 (plugin threshold-seg 1.0): succeeded 2026-01-02 03:04:05 UTC -- 1 SEG",
        f"    output Segmentation Storage {OUTPUT}.1 (series {OUTPUT}, made by threshold-seg 1.0)",
        "      -> pacs: 1 delivered 2026-01-02 03:04:05 UTC",
        "  job #2 revision 1 rule ct-seg action 1 (forward): succeeded 2026-01-02 03:04:05 UTC -- queued 2",
        "    -> pacs: 2 failed -- 0xA700 out of resources",
    ]


def test_an_instance_of_the_source_leads_to_the_same_chain(engine: Engine) -> None:
    assert lineage(engine, f"{SOURCE}.2") == lineage(engine, SOURCE)


def test_an_output_says_which_series_it_was_made_from(engine: Engine) -> None:
    for uid in (OUTPUT, f"{OUTPUT}.1"):
        lines = lineage(engine, uid)
        assert lines[0] == f"{uid} was made by this node from series {SOURCE}:"
        assert lines[1:] == lineage(engine, SOURCE)


def test_a_series_no_rule_touched_says_so(engine: Engine) -> None:
    assert lineage(engine, QUIET) == [f'source series {QUIET} (MR "knee", 1 instances)', "  no jobs"]


def test_an_unknown_uid_is_not_found_by_name(engine: Engine) -> None:
    with pytest.raises(NotFound, match=r"no instance or series 1\.2\.3\.4 in the index"):
        lineage(engine, "1.2.3.4")
