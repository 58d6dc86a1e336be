"""The read model: the counts and rows people see, the same in the command line, the dashboard/API and the metrics.

One small index (SQLite, migrated) is filled through the node's own writers: a series with three
instances, two forward jobs (one failed, one succeeded) and three deliveries to "pacs" (one
delivered, one failed for good, one queued again after a transient failure). Each view is then
asked what a user would ask.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from node.index import read
from node.index.db import make_engine, migrate
from node.index.models import Instance, Patient, Series, Study, utcnow
from node.index.states import DeliveryState, JobState
from node.jobs import store
from node.send import queue

SERIES_UID = "1.2.826.0.1.3680043.8.498.100"
REFUSED = "0xA700 out of resources"


def _instances(conn, n: int) -> list[int]:
    conn.execute(
        Patient.__table__.insert().values(id=1, patient_id="P1", patient_name="READ^MODEL", birth_date="19700101")
    )
    conn.execute(Study.__table__.insert().values(id=1, study_instance_uid="1.2.826.0.1.3680043.8.498.1", patient_fk=1))
    conn.execute(
        Series.__table__.insert().values(
            id=1, series_instance_uid=SERIES_UID, study_fk=1, modality="CT", series_description="head", instance_count=n
        )
    )
    ids = []
    for k in range(1, n + 1):
        ids.append(
            conn.execute(
                Instance.__table__.insert()
                .values(
                    sop_instance_uid=f"{SERIES_UID}.{k}",
                    series_fk=1,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    file_path=f"store/{k}.dcm",
                    file_size=1000,
                    checksum="0" * 64,
                )
                .returning(Instance.__table__.c.id)
            ).scalar_one()
        )
    return ids


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """(engine, config path) of a small index filled through the node's writers."""
    root = tmp_path_factory.mktemp("read")
    (root / "data").mkdir()
    config = root / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{root / "data"}"\n')
    engine = make_engine(f"sqlite:///{root / 'data' / 'index.sqlite'}")
    migrate(engine)
    with engine.begin() as conn:
        instances = _instances(conn, 3)
        jobs = store.create_jobs(
            conn,
            1,
            1,
            [
                store.NewJob("to-nowhere", 0, "forward", {"to": ["nowhere"]}),
                store.NewJob("to-pacs", 0, "forward", {"to": ["pacs"]}),
            ],
            series_uid=SERIES_UID,
        )
    first = store.claim_next(engine, "test")
    assert first is not None
    store.finish(engine, first.id, "test", ok=False, error="no destination 'nowhere'")
    second = store.claim_next(engine, "test")
    assert second is not None
    with engine.begin() as conn:
        queue.enqueue(conn, instances, ["pacs"], job_id=second.id)
    store.finish(engine, second.id, "test", ok=True, result="queued 3 instance(s) for pacs")
    claimed = queue.claim(engine, "pacs", 10, "test")
    assert len(claimed) == 3
    ok, refused, later = (c.id for c in claimed)
    queue.record(
        engine,
        [
            queue.Outcome(ok, DeliveryState.DELIVERED, 0),
            queue.Outcome(refused, DeliveryState.FAILED, 0xA700, REFUSED),
            queue.Outcome(later, DeliveryState.QUEUED, None, "connection refused", retry_at=utcnow()),
        ],
        "test",
    )
    yield engine, config, jobs
    engine.dispose()


def test_summary_counts_what_the_index_holds(index):
    engine, _, _ = index
    s = read.summary(engine)
    assert (s.patients, s.studies, s.series, s.instances, s.outputs, s.stored_bytes) == (1, 1, 1, 3, 0, 3000)
    # Every state is listed, also those no row is in.
    assert s.states.jobs == {"pending": 0, "running": 0, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert s.states.series == {"receiving": 1, "stable": 0, "triggered": 0}
    assert s.states.deliveries == {"pacs": {"delivered": 1, "failed": 1, "queued": 1}}
    assert s.states.delivery_states("pacs") == {
        "queued": 1,
        "sending": 0,
        "delivered": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert read.received_and_sent(engine) == (3, 1)


def test_destination_queue_and_rows(index):
    engine, _, _ = index
    (pacs,) = read.destinations(engine)
    assert pacs.destination == "pacs" and pacs.states["failed"] == 1
    assert pacs.oldest_queued is not None and pacs.next_attempt is not None
    assert pacs.last_error in (REFUSED, "connection refused")
    failed = read.deliveries(engine, read.DeliveryQuery(state="failed"))
    assert failed.total == 1
    (row,) = failed.items
    assert (row.destination, row.state, row.last_status, row.last_error) == ("pacs", "failed", 0xA700, REFUSED)
    assert row.sop_instance_uid.startswith(SERIES_UID) and row.series_instance_uid == SERIES_UID
    assert row.next_attempt_at is None, "only a queued delivery has a next attempt"
    (waiting,) = read.deliveries(engine, read.DeliveryQuery(state="queued")).items
    assert waiting.next_attempt_at is not None and waiting.next_attempt_at.tzinfo is dt.UTC
    assert read.deliveries(engine, read.DeliveryQuery(series_uid=SERIES_UID, limit=2)).total == 3
    assert len(read.deliveries(engine, read.DeliveryQuery(series_uid=SERIES_UID, limit=2)).items) == 2
    assert read.deliveries(engine, read.DeliveryQuery("elsewhere")).total == 0


def test_job_rows_and_detail(index):
    engine, _, (failed_id, ok_id) = index
    page = read.jobs(engine)
    assert page.total == 2 and [j.id for j in page.items] == [ok_id, failed_id], "newest first"
    ok, failed = page.items
    assert (ok.state, ok.detail, ok.modality) == (JobState.SUCCEEDED, "queued 3 instance(s) for pacs", "CT")
    assert (failed.state, failed.detail) == (JobState.FAILED, "no destination 'nowhere'")
    assert [j.id for j in read.jobs(engine, state="failed").items] == [failed_id]
    detail = read.job(engine, ok_id)
    assert detail is not None and detail.action == '{"to": ["pacs"]}' and detail.series_description == "head"
    assert read.job(engine, 999) is None
    assert [j.id for j in read.series_jobs(engine, 1)] == [failed_id, ok_id]
    (series,) = read.series(engine, q="read^model").items
    assert (series.series_instance_uid, series.instance_count, series.patient_name) == (SERIES_UID, 3, "READ^MODEL")


def _cli(*args: str) -> str:
    from node.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_the_command_line_shows_the_same(index):
    _, config, (failed_id, _) = index
    queue_table = _cli("queue", "--config", str(config))
    (line,) = [line for line in queue_table.splitlines() if "pacs" in line]
    cells = [cell.strip() for cell in line.split("│")[1:-1]]
    header = ["destination", "queued", "sending", "delivered", "failed", "cancelled"]
    assert dict(zip(header, cells, strict=False)) == {
        "destination": "pacs (not configured)",
        "queued": "1",
        "sending": "0",
        "delivered": "1",
        "failed": "1",
        "cancelled": "0",
    }, queue_table
    assert cells[-1] in (REFUSED, "connection refused")
    failed = _cli("queue", "--state", "failed", "--config", str(config))
    assert REFUSED in failed and "0xA700" in failed and SERIES_UID in failed
    jobs = _cli("jobs", "--config", str(config))
    assert "no destination 'nowhere'" in jobs and "CT " + SERIES_UID in jobs
    status = _cli("status", "--config", str(config))
    assert "jobs: failed: 1  succeeded: 1" in status
    assert "deliveries to pacs: delivered: 1  failed: 1  queued: 1" in status
    assert "READ^MODEL" in status
    shown = _cli("jobs", "show", str(failed_id), "--config", str(config))
    assert "no destination 'nowhere'" in shown and "failed" in shown


def test_metrics_and_the_api_show_the_same(index):
    from node.metrics import StateCollector
    from node.web import api, data

    engine, _, _ = index
    samples = {
        (m.name, tuple(sorted(s.labels.items()))): s.value for m in StateCollector(engine).collect() for s in m.samples
    }
    assert samples[("dicom_node_queue_deliveries", (("destination", "pacs"), ("state", "failed")))] == 1
    assert samples[("dicom_node_queue_deliveries", (("destination", "pacs"), ("state", "cancelled")))] == 0
    assert samples[("dicom_node_jobs", (("state", "failed"),))] == 1
    assert samples[("dicom_node_series", (("state", "receiving"),))] == 1
    # The API's models are the JSON of the read model's rows: the same fields, and every row fits.
    for model, row in ((api.JobModel, read.JobRow), (api.DeliveryModel, read.DeliveryRow)):
        assert set(model.model_fields) == {f.name for f in dataclasses.fields(row)}
    assert set(api.JobDetail.model_fields) == {f.name for f in dataclasses.fields(read.JobDetail)}
    assert set(api.SeriesModel.model_fields) == {f.name for f in dataclasses.fields(read.SeriesRow)}
    page = api.JobPage.model_validate(data.page_json(read.jobs(engine)))
    assert {j.state for j in page.items} == {"failed", "succeeded"}
    assert (
        api.DeliveryPage.model_validate(data.page_json(read.deliveries(engine, read.DeliveryQuery(state="failed"))))
        .items[0]
        .last_error
        == REFUSED
    )
    with engine.connect() as conn:
        assert conn.execute(select(Instance.__table__.c.id)).all(), "nothing here deletes"
