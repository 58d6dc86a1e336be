"""The same node on PostgreSQL: a throwaway cluster started by the test, on loopback."""

from __future__ import annotations

from helpers import dataset_bytes, make_ct_series, storescu, wait_for
from sqlalchemy import create_engine, text


def test_node_on_postgresql(node, tmp_path, postgres_url):
    files = make_ct_series(tmp_path / "a", 40) + make_ct_series(tmp_path / "b", 40)
    node.env = {"DICOM_NODE_DATABASE__URL": postgres_url}
    node.start()
    procs = [storescu(node.port, files[:40]), storescu(node.port, files[40:])]
    assert all(p.returncode == 0 for p in procs)
    # Duplicates stay single rows on PostgreSQL too.
    assert storescu(node.port, files[:5]).returncode == 0
    node.stop()
    engine = create_engine(postgres_url)
    with engine.connect() as c:
        rows = dict(c.execute(text("select sop_instance_uid, file_path from instance")).all())
        counts = c.execute(text("select instance_count from series order by id")).scalars().all()
        version = c.execute(text("select version_num from alembic_version")).scalar()
        audited = dict(
            c.execute(text("select kind, count(*) from audit_event where kind like 'instance%' group by kind")).all()
        )
    engine.dispose()
    assert len(rows) == 80 and counts == [40, 40]
    from alembic.script import ScriptDirectory

    from node.index.db import alembic_config

    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head(), (
        "migrated to the newest revision"
    )
    # The receive path's audit rows, written in the index writer's transactions, on PostgreSQL too.
    assert audited == {"instance_stored": 80, "instance_duplicate": 5}
    from helpers import read_sop_uid

    for f in files:
        assert dataset_bytes(node.data_dir / rows[read_sop_uid(f)]) == dataset_bytes(f)
    # Restart on the same database: migrations are idempotent, recovery finds nothing to do.
    node.start()
    assert "Traceback" not in node.log()


def test_series_tracker_and_jobs_on_postgresql(node, tmp_path, postgres_url):
    """Revisions, stability, the unique job constraint and the workers run on PostgreSQL too."""
    from helpers import StoreSCP

    scp = StoreSCP(tmp_path / "scp").start()
    try:
        files = make_ct_series(tmp_path / "c", 12)
        node.env = {"DICOM_NODE_DATABASE__URL": postgres_url}
        node.extra_config = f"""
[tracker]
stable_after = 1
use_expected_counts = false
{scp.destination()}
[[rules]]
name = "ct"
on_revision = "rerun"
match = {{ Modality = "CT", instances = {{ ">=" = 6 }} }}
actions = [{{ type = "forward", to = ["scp"] }}]
"""
        node.start()
        engine = create_engine(postgres_url)

        def job_rows() -> list:
            with engine.connect() as c:
                return c.execute(
                    text(
                        "select j.revision, j.state, j.result from job j join series s on "
                        "s.id = j.series_fk where s.series_instance_uid = :u order by j.id"
                    ),
                    {"u": series_uid},
                ).all()

        from pydicom import dcmread

        series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        assert storescu(node.port, files[:6]).returncode == 0
        wait_for(lambda: job_rows() and job_rows()[-1][1] == "succeeded", 30, "the revision 1 job")
        assert storescu(node.port, files[6:]).returncode == 0  # after triggering: revision 2
        wait_for(lambda: len(job_rows()) == 2 and job_rows()[-1][1] == "succeeded", 30, "the revision 2 job")
        assert [tuple(r) for r in job_rows()] == [
            (1, "succeeded", "queued 6 instance(s) for scp"),
            (2, "succeeded", "queued 6 instance(s) for scp"),
        ]
        # the forward queue lives in PostgreSQL too
        with engine.connect() as c:
            wait_for(
                lambda: (
                    c.execute(text("select state, count(*) from delivery group by state")).all() == [("delivered", 12)]
                ),
                30,
                "12 deliveries",
            )
        assert len(scp.received()) == 12
        engine.dispose()
    finally:
        scp.stop()


def test_plugin_job_and_lineage_on_postgresql(node, tmp_path, postgres_url):
    """A plugin job on PostgreSQL: the SEG is stored, indexed with its job, and its series is not tracked."""
    files = make_ct_series(tmp_path / "c", 8)
    node.env = {"DICOM_NODE_DATABASE__URL": postgres_url}
    node.extra_config = """
[tracker]
stable_after = 1
use_expected_counts = false
[[rules]]
name = "bone"
match = { Modality = "CT" }
actions = [{ type = "plugin", plugin = "threshold-seg", params = { segments = [{ label = "Bone", lower = 300, type = "Bone" }] } }]
"""
    node.start()
    assert storescu(node.port, files).returncode == 0
    engine = create_engine(postgres_url)
    try:

        def job_row():  # type: ignore[no-untyped-def]
            with engine.connect() as c:
                return c.execute(text("select id, state, software, last_error from job where rule = 'bone'")).first()

        wait_for(lambda: (r := job_row()) is not None and r[1] in ("succeeded", "failed"), 60, "the plugin job")
        row = job_row()
        assert row is not None and row[1] == "succeeded", row
        assert row[2] == "threshold-seg 1.0"
        with engine.connect() as c:
            seg = c.execute(
                text(
                    "select i.file_path, s.state from instance i join series s on s.id = i.series_fk "
                    "where i.job_fk = :j"
                ),
                {"j": row[0]},
            ).all()
        assert len(seg) == 1 and seg[0][1] == "triggered"
        assert (node.data_dir / seg[0][0]).is_file()
    finally:
        engine.dispose()
