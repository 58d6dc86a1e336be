"""The Alembic migrations build exactly the schema the models describe, and run twice safely."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from node.index.db import make_engine, migrate
from node.index.models import Base

#: Indexes with a DESC column or an expression: Alembic cannot compare expression indexes (it reports them
#: as removed and added again); they are checked by name below instead.
DESC_INDEXES = {"ix_job_claim_order": "job", "ix_delivery_claim_order": "delivery", "ix_patient_name_lower": "patient"}


def _comparable(obj: Any, name: str | None, type_: str, _reflected: bool, _compare_to: Any) -> bool:
    return not (type_ == "index" and name in DESC_INDEXES)


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_migrations_match_models(any_index_url: str) -> None:
    engine = make_engine(any_index_url)
    migrate(engine)
    migrate(engine)  # idempotent: a restart runs it again
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_object": _comparable})
        assert compare_metadata(ctx, Base.metadata) == []
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    # From the catalogue: SQLAlchemy does not reflect SQLite's expression indexes.
    catalogue = (
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'"
        if engine.dialect.name == "sqlite"
        else "SELECT indexname, tablename FROM pg_indexes"
    )
    with engine.connect() as conn:
        found = {name: table for name, table in conn.exec_driver_sql(catalogue) if name in DESC_INDEXES}
        if engine.dialect.name == "postgresql":
            definition = conn.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_patient_name_lower'"
            ).scalar_one()
            assert "text_pattern_ops" in definition  # serves LIKE 'doe%' whatever the collation
    assert found == DESC_INDEXES
    engine.dispose()


def _insert(conn: Any, table: str, **values: Any) -> None:
    """A row written as an older schema has it (the models describe the newest one)."""
    from sqlalchemy import text

    conn.execute(
        text(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)})"), values
    )


def test_0009_keeps_an_index_from_before(any_index_url: str) -> None:
    """An index made before 0009 is upgraded in place: its series get empty SeriesDate/SeriesTime and are
    found by the query engine, a patient's name through the new index."""
    import datetime as dt

    from alembic import command

    from node.index import query
    from node.index.db import alembic_config

    engine = make_engine(any_index_url)
    cfg = alembic_config(engine)
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0008")
        empty = dict.fromkeys(("issuer_of_patient_id", "birth_date", "sex"), "")
        _insert(conn, "patient", id=1, patient_id="P1", patient_name="OLD^Patient", created_at=now, **empty)
        empty = dict.fromkeys(("study_time", "accession_number", "study_id", "study_description"), "")
        _insert(
            conn,
            "study",
            id=1,
            study_instance_uid="1.2.3",
            patient_fk=1,
            study_date="20200101",
            referring_physician_name="",
            created_at=now,
            **empty,
        )
        texts = ("series_description", "body_part_examined", "protocol_name", "manufacturer", "station_name")
        _insert(
            conn,
            "series",
            id=1,
            series_instance_uid="1.2.3.4",
            study_fk=1,
            modality="CT",
            frame_of_reference_uid="",
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            state="stable",
            revision=1,
            revision_instances=0,
            revision_started_at=now,
            **dict.fromkeys(texts, ""),
        )
    migrate(engine)
    with engine.connect() as conn:
        [series] = query.find(conn, query.Query("SERIES", keys={"PatientName": "old^patient", "SeriesDate": ""}))
        assert series.SeriesInstanceUID == "1.2.3.4" and series["SeriesDate"].is_empty
    engine.dispose()


def test_down_to_0009_and_up_again_keeps_what_a_rerun_made(any_index_url: str) -> None:
    """A downgrade below 0012 folds a match's runs into its first: the rerun's output, its delivery and its
    prior retrieval are named as the first run's (no foreign key breaks, nothing derived is lost); below
    0010/0011 the study rule firing and the prior retrievals go with their tables, and the way back up works."""
    import json

    from alembic import command
    from sqlalchemy import select, text
    from sqlalchemy.orm import Session

    from node.index.db import alembic_config, migration_connection
    from node.index.models import Delivery, Instance, Job, Patient, PriorFetch, Series, Study, StudyTrigger

    engine = make_engine(any_index_url)
    migrate(engine)
    with Session(engine) as s:
        study = Study(study_instance_uid="1.5", patient=Patient(patient_id="P5"))
        source = Series(series_instance_uid="1.5.1", study=study, state="triggered")
        output = Series(series_instance_uid="1.5.2", study=study, state="triggered")
        s.add_all([source, output])
        s.flush()
        trigger = StudyTrigger(
            study_fk=study.id,
            rule="seg",
            revision=1,
            inputs=json.dumps({"primary": "ct", "inputs": {}}),
            inputs_key="k" * 64,
            primary_series_fk=source.id,
            reason="every input stable",
        )
        s.add(trigger)
        s.flush()
        first, rerun = (
            Job(
                series_fk=source.id,
                revision=1,
                rule="seg",
                action_index=0,
                run=run,
                kind="plugin",
                action="{}",
                state="succeeded",
                study_trigger_fk=trigger.id,
            )
            for run in (1, 2)
        )
        s.add_all([first, rerun])
        s.flush()
        made = Instance(
            sop_instance_uid="1.5.2.1",
            series=output,
            job_fk=rerun.id,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            file_path="storage/x/1.dcm",
            file_size=1,
            checksum="0" * 64,
        )
        s.add(made)
        s.flush()
        s.add(
            Delivery(
                instance_fk=made.id,
                series_fk=output.id,
                job_fk=rerun.id,
                destination="pacs",
                sop_instance_uid="1.5.2.1",
            )
        )
        for job, study_uid in ((first, "1.4"), (rerun, "1.4"), (rerun, "1.3")):
            s.add(PriorFetch(job_fk=job.id, source="pacs", study_uid=study_uid, state="retrieved"))
        s.commit()
        first_id = first.id
    cfg = alembic_config(engine)
    with migration_connection(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0011")
        assert sorted(conn.execute(text("SELECT job_fk, study_uid FROM prior_fetch")).all()) == [
            (first_id, "1.3"),
            (first_id, "1.4"),
        ]
        command.downgrade(cfg, "0009")
        assert conn.execute(text("SELECT id FROM job")).scalars().all() == [first_id]
        assert conn.execute(text("SELECT job_fk FROM instance")).scalars().all() == [first_id]
        assert conn.execute(text("SELECT job_fk FROM delivery")).scalars().all() == [first_id]
    migrate(engine)
    with Session(engine) as s:
        assert s.execute(select(Job.id, Job.run, Job.study_trigger_fk)).all() == [(first_id, 1, None)]
        assert s.execute(select(Instance.job_fk)).scalars().all() == [first_id]
    engine.dispose()


def test_a_dangling_reference_left_by_something_else_neither_stops_a_start_nor_an_upgrade(tmp_path: Any) -> None:
    """SQLite migrations check that they break no foreign key: only what they broke counts. A row some other
    tool deleted under its references (the rows were there before) does not stop the node starting at head,
    nor an upgrade of an older index; the check runs only when there is something to migrate."""
    from alembic import command
    from sqlalchemy import text

    from node.index.db import alembic_config, migration_connection

    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    raw = engine.raw_connection()
    try:
        raw.execute("PRAGMA foreign_keys=OFF")  # enforced on the node's connections: off for this one
        raw.execute(
            "INSERT INTO delivery (id, series_fk, job_fk, destination, sop_instance_uid, priority, state,"
            " attempts, next_attempt_at, warning, sent_transfer_syntax, created_at, updated_at, commitment,"
            " commitment_uid, last_error) VALUES (1, 999, 998, 'pacs', '1.2', 0, 'queued', 0,"
            " '2026-01-01', '', '', '2026-01-01', '2026-01-01', 'none', '', '')"
        )
        raw.commit()
    finally:
        raw.close()
    migrate(engine)  # at head: starts
    cfg = alembic_config(engine)
    with migration_connection(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0011")
    migrate(engine)  # an upgrade with the old dangling row still there
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM delivery")).scalar_one() == 1
    engine.dispose()
