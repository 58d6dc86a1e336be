"""The audit trail: what a node records as DCMTK peers store to it, rules fire, plugins run, deliveries go out
and operators act; that the database refuses to change it; and that it holds no patient names."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys

import pydicom
import pytest
from helpers import REPO, StoreSCP, free_port, make_ct_series, read_sop_uid, storescu, wait_for
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from node import audit
from node.index.db import make_engine, migrate
from node.index.models import Patient, Series, Study

AUDIT_COLUMNS = (
    "kind",
    "actor",
    "calling_ae",
    "called_ae",
    "peer_address",
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "rule",
    "job_id",
    "destination",
    "status",
    "detail",
)


def events(node, kind: str | None = None) -> list[dict]:  # type: ignore[no-untyped-def]
    sql = f"select {', '.join(AUDIT_COLUMNS)} from audit_event"
    rows = node.query(sql + " where kind = ? order by id", kind) if kind else node.query(sql + " order by id")
    return [dict(zip(AUDIT_COLUMNS, r, strict=True)) for r in rows]


def secret_series(folder, count: int, **kw) -> list:  # type: ignore[no-untyped-def]
    """A synthetic CT series of a patient whose name and ID must never reach the audit table."""
    files = make_ct_series(folder, count, patient_name="Doe^Secret", **kw)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID = "PID-SECRET-123"
        ds.save_as(f, enforce_file_format=True)
    return files


def assert_no_patient_data(node) -> None:  # type: ignore[no-untyped-def]
    dump = "\n".join(map(str, node.query("select * from audit_event")))
    for secret in ("Doe^Secret", "Doe", "PID-SECRET-123", "19700101"):
        assert secret not in dump


def test_associations_instances_rules_outputs_and_deliveries_are_audited(node, tmp_path):
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
[[rules]]
name = "route-and-segment"
actions = [{{ type = "forward", to = ["scp"] }},
           {{ type = "plugin", plugin = "threshold-seg", send_to = ["scp"] }}]
"""
        node.start()
        files = secret_series(tmp_path / "ct", 6)
        sops = {read_sop_uid(f) for f in files}
        series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert storescu(node.port, files, aet="AUDITSCU").returncode == 0
        wait_for(
            lambda: node.query("select count(*) from job where state = 'succeeded'")[0][0] == 2,
            120,
            "both jobs to succeed",
        )
        outputs = {r[0] for r in node.query("select sop_instance_uid from instance where job_fk is not null")}
        assert outputs
        node.wait_delivered(len(sops) + len(outputs), timeout=120)
        wait_for(lambda: len(events(node, "delivered")) == len(sops) + len(outputs), 30, "delivered events")
    finally:
        node.stop()
        scp.stop()

    accepted = [e for e in events(node, "association_accepted") if e["calling_ae"] == "AUDITSCU"]
    assert len(accepted) == 1
    assert accepted[0]["called_ae"] == "DICOM_NODE" and accepted[0]["peer_address"] == "127.0.0.1"

    stored = events(node, "instance_stored")
    assert sorted(e["sop_instance_uid"] for e in stored) == sorted(sops)  # one row per instance, no more
    for e in stored:
        assert (e["calling_ae"], e["called_ae"], e["peer_address"]) == ("AUDITSCU", "DICOM_NODE", "127.0.0.1")
        assert (e["series_uid"], e["study_uid"], e["status"]) == (series_uid, study_uid, 0)

    fired = events(node, "rule_fired")
    assert [(e["rule"], e["series_uid"], e["detail"]) for e in fired] == [
        ("route-and-segment", series_uid, "revision 1")
    ]
    jobs = dict(node.query("select id, kind from job"))
    created = events(node, "job_created")
    assert sorted(e["job_id"] for e in created) == sorted(jobs)
    assert {e["rule"] for e in created} == {"route-and-segment"} and {e["series_uid"] for e in created} == {series_uid}

    produced = events(node, "output_produced")
    plugin_job = next(pk for pk, kind in jobs.items() if kind == "plugin")
    assert {e["sop_instance_uid"] for e in produced} == outputs and len(produced) == len(outputs)
    for e in produced:
        assert e["job_id"] == plugin_job and e["rule"] == "route-and-segment"
        assert e["detail"].startswith("threshold-seg ")  # plugin and version
        assert e["study_uid"] == study_uid  # the output belongs to the source's study

    delivered = events(node, "delivered")
    assert {e["sop_instance_uid"] for e in delivered} == sops | outputs
    assert {(e["destination"], e["status"]) for e in delivered} == {("scp", 0)}
    assert {e["job_id"] for e in delivered} == set(jobs)
    assert events(node, "delivery_failed") == []
    assert_no_patient_data(node)


def test_rejected_associations_and_duplicates_are_audited(node, tmp_path):
    node.extra_config = (
        '[[access.allowed_peers]]\nae_title = "GOODSCU"\n[[access.allowed_peers]]\nae_title = '
        '"FARSCU"\nhosts = ["10.9.9.9"]\n'
    )
    node.start()
    files = secret_series(tmp_path / "ct", 3)
    assert storescu(node.port, files, aet="GOODSCU").returncode == 0
    assert storescu(node.port, files, aet="GOODSCU").returncode == 0  # again: duplicates, first copy kept
    assert storescu(node.port, files[:1], aet="GOODSCU", ae="NOT_US").returncode != 0
    assert storescu(node.port, files[:1], aet="STRANGER").returncode != 0
    assert storescu(node.port, files[:1], aet="FARSCU").returncode != 0

    def ours() -> list[dict]:  # (node.start's C-ECHO as ECHOSCU was refused too)
        return [e for e in events(node, "association_rejected") if e["calling_ae"] != "ECHOSCU"]

    rejected = wait_for(lambda: len(ours()) == 3 and ours(), 10, "three rejections in the audit table")
    by_caller = {e["calling_ae"]: e for e in rejected}
    assert by_caller["GOODSCU"]["called_ae"] == "NOT_US"
    assert "called AE title 'NOT_US' is not ours" in by_caller["GOODSCU"]["detail"]
    assert "'STRANGER' is not in access.allowed_peers" in by_caller["STRANGER"]["detail"]
    assert "not allowed from 127.0.0.1" in by_caller["FARSCU"]["detail"]
    assert {e["peer_address"] for e in rejected} == {"127.0.0.1"}
    assert len([e for e in events(node, "association_accepted") if e["calling_ae"] == "GOODSCU"]) == 2
    assert len(events(node, "instance_stored")) == 3
    duplicates = events(node, "instance_duplicate")
    assert sorted(e["sop_instance_uid"] for e in duplicates) == sorted(read_sop_uid(f) for f in files)
    assert all("first copy kept" in e["detail"] for e in duplicates)
    assert_no_patient_data(node)


def _cli(node, *args: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(node.config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_operator_actions_are_audited_with_their_actor(node, tmp_path):
    node.extra_config = f"""
[tracker]
stable_after = 1
[[destinations]]
name = "dead"
ae_title = "NOBODY"
host = "127.0.0.1"
port = {free_port()}
retry = {{ initial_delay = 30, max_delay = 60 }}
[[rules]]
name = "forward-then-discard"
actions = [{{ type = "forward", to = ["dead"] }}, {{ type = "discard" }}]
"""
    node.start()
    files = make_ct_series(tmp_path / "ct", 3)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.deliveries().get("queued") == 3, 60, "three queued deliveries")
    discard = wait_for(
        lambda: node.query("select id from job where kind = 'discard' and state = 'pending'"),
        30,
        "a discard job waiting for the deliveries",
    )[0][0]

    r = _cli(node, "jobs", "cancel", str(discard))
    assert r.returncode == 0, r.stderr
    r = _cli(node, "queue", "cancel", "--destination", "dead")
    assert r.returncode == 0, r.stderr
    r = _cli(node, "queue", "retry", "--destination", "dead")
    assert r.returncode == 0, r.stderr
    r = _cli(node, "jobs", "retry", str(discard))
    assert r.returncode == 0, r.stderr
    assert _cli(node, "jobs", "retry", str(discard)).returncode != 0  # pending now: refused, and not audited

    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    # (queue_retry_now, which the CLI's retry also runs, is recorded only when it finds waiting deliveries)
    ops = [e for e in events(node) if e["kind"] in ("job_retry", "job_cancel", "queue_retry", "queue_cancel")]
    assert [(e["kind"], e["actor"]) for e in ops] == [
        ("job_cancel", "cli"),
        ("queue_cancel", "cli"),
        ("queue_retry", "cli"),
        ("job_retry", "cli"),
    ]
    assert (ops[0]["job_id"], ops[0]["rule"], ops[0]["series_uid"], ops[0]["detail"]) == (
        discard,
        "forward-then-discard",
        series_uid,
        "was pending",
    )
    assert (ops[1]["destination"], ops[1]["detail"]) == ("dead", "3 deliveries cancelled")
    assert (ops[2]["destination"], ops[2]["detail"]) == ("dead", "3 failed or cancelled deliveries queued again")
    assert (ops[3]["job_id"], ops[3]["detail"]) == (discard, "was cancelled")


def test_a_web_user_is_the_actor_of_what_they_do(tmp_path):
    """The functions the web layer calls take the user's name."""
    from node.jobs.store import NewJob, cancel, create_jobs, retry
    from node.send import queue

    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    with Session(engine) as s:
        s.add(
            Series(
                series_instance_uid="1.2.3.4",
                state="triggered",
                study=Study(study_instance_uid="1.2.3", patient=Patient()),
            )
        )
        s.commit()
    with engine.begin() as conn:
        (job,) = create_jobs(
            conn, 1, 1, [NewJob("r", 0, "discard", {"type": "discard"})], series_uid="1.2.3.4", study_uid="1.2.3"
        )
    cancel(engine, job, actor="alice")
    retry(engine, job, actor="bob")
    assert queue.cancel(engine, destination="pacs", actor="carol") == 0
    got = audit.query(engine, kind=["job_created", "job_cancel", "job_retry", "queue_cancel"])
    assert [(e["kind"], e["actor"], e["job_id"]) for e in got] == [
        ("queue_cancel", "carol", None),
        ("job_retry", "bob", job),
        ("job_cancel", "alice", job),
        ("job_created", "node", job),
    ]
    assert got[-1]["series_uid"] == "1.2.3.4" and got[-1]["study_uid"] == "1.2.3"
    engine.dispose()


def test_query_filters_and_pages(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    t0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    with engine.begin() as conn:
        audit.record_many(
            conn,
            [
                audit.row(
                    "instance_stored",
                    at=t0 + dt.timedelta(minutes=i),
                    calling_ae="CT1",
                    study_uid="1.1",
                    series_uid=f"1.1.{i % 2}",
                    sop_instance_uid=f"1.1.{i % 2}.{i}",
                    status=0,
                )
                for i in range(10)
            ],
        )
        audit.record(conn, "delivered", destination="pacs", sop_instance_uid="1.1.0.4", status=0xB000)
    assert len(audit.query(engine)) == 11
    assert [e["sop_instance_uid"] for e in audit.query(engine, uid="1.1.0.4")] == ["1.1.0.4", "1.1.0.4"]
    assert len(audit.query(engine, uid="1.1.1")) == 5  # a series UID
    assert len(audit.query(engine, uid="1.1")) == 10  # a study UID
    window = audit.query(engine, since=t0 + dt.timedelta(minutes=2), until=t0 + dt.timedelta(minutes=5))
    assert [e["sop_instance_uid"] for e in window] == ["1.1.0.4", "1.1.1.3", "1.1.0.2"]  # newest first
    assert window[0]["at"] == t0 + dt.timedelta(minutes=4)  # aware UTC
    naive = audit.query(
        engine,
        since=(t0 + dt.timedelta(minutes=2)).replace(tzinfo=None),
        until=(t0 + dt.timedelta(minutes=5)).replace(tzinfo=None),
    )
    assert naive == window
    page = audit.query(engine, kind="instance_stored", limit=3, offset=3)
    assert [e["sop_instance_uid"] for e in page] == ["1.1.0.6", "1.1.1.5", "1.1.0.4"]
    assert audit.count(engine, kind="instance_stored", uid="1.1.1") == 5
    line = audit.format_event(audit.query(engine, kind="delivered")[0])
    assert " delivered " in line and "destination=pacs" in line and "sop=1.1.0.4" in line and "status=0xB000" in line
    with pytest.raises(ValueError, match="unknown audit event kind"):
        audit.query(engine, kind="stored")
    engine.dispose()


def _sqlite_refuses_changes(path) -> None:  # type: ignore[no-untyped-def]
    con = sqlite3.connect(path)
    try:
        before = con.execute("select count(*) from audit_event").fetchone()[0]
        assert before > 0
        for sql in (
            "update audit_event set detail = 'rewritten'",
            "delete from audit_event",
            "update audit_event set kind = 'delivered' where id = 1",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute(sql)
            con.rollback()
        assert con.execute("select count(*) from audit_event").fetchone()[0] == before
        assert con.execute("select count(*) from audit_event where detail = 'rewritten'").fetchone()[0] == 0
    finally:
        con.close()


def test_sqlite_refuses_to_change_or_delete_audit_rows(node, tmp_path):
    node.start()
    assert storescu(node.port, make_ct_series(tmp_path / "ct", 2)).returncode == 0
    node.stop()
    _sqlite_refuses_changes(node.data_dir / "index.sqlite")


def test_postgresql_refuses_to_change_delete_or_truncate_audit_rows(postgres_url):
    engine = make_engine(postgres_url)
    migrate(engine)
    with engine.begin() as conn:
        audit.record(conn, "association_accepted", calling_ae="PGSCU", peer_address="127.0.0.1")
    assert [e["calling_ae"] for e in audit.query(engine, kind="association_accepted")] == ["PGSCU"]
    engine.dispose()
    raw = create_engine(postgres_url)
    for sql in ("update audit_event set detail = 'rewritten'", "delete from audit_event", "truncate audit_event"):
        with pytest.raises(Exception, match="append-only"), raw.begin() as conn:
            conn.execute(text(sql))
    with raw.connect() as conn:
        assert conn.execute(text("select count(*) from audit_event where calling_ae = 'PGSCU'")).scalar() == 1
        assert conn.execute(text("select count(*) from audit_event where detail = 'rewritten'")).scalar() == 0
    raw.dispose()
