"""Retention, end to end: a node receives and forwards with DCMTK peers, then the clean-up runs.

Series are made "old" by moving their times back in the index (what a month of waiting would do);
everything else is real: the node, storescu, storescp, the command line and the scheduler.
After every run the index and the files must agree exactly.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from helpers import REPO, StoreSCP, make_ct_series, series_files, storescu, wait_for

CT = "ct-head-philips-5mm"
MR = "mr-t1-sag-siemens"
PLUGINS_PATH = {"PYTHONPATH": str(REPO / "tests" / "plugins")}
#: A destination that never answers; its deliveries fail for good within seconds.
DOWN_RETRY = "{ initial_delay = 0.2, max_delay = 0.5, give_up_after = 2 }"


@pytest.fixture
def scp(tmp_path: Path):
    s = StoreSCP(tmp_path / "scp-out").start()
    yield s
    s.stop()


#: CT series go to the storescp destination (and arrive), MR series to "down" (and never do).
CT_TO_SCP_MR_TO_DOWN = """[[rules]]
name = "ct"
match = { Modality = "CT" }
actions = [{ type = "forward", to = ["scp"] }]
[[rules]]
name = "mr"
match = { Modality = "MR" }
actions = [{ type = "forward", to = ["down"] }]
"""


def down(tmp_path: Path) -> str:
    return StoreSCP(tmp_path / "never", ae_title="DOWN").destination("down", retry=DOWN_RETRY)


def uid_of(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def cli(node, *args: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    r = subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(node.config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **PLUGINS_PATH, **node.env},
    )
    assert "Traceback" not in r.stderr, r.stderr
    return r


def retention_cli(node, *args: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return cli(node, "retention", *args)


def show(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"


def stamp(days_ago: float) -> str:
    """A time as the index stores it (UTC text)."""
    return (dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)).strftime("%Y-%m-%d %H:%M:%S.%f")


def make_old(node, uid: str, days: float) -> None:  # type: ignore[no-untyped-def]
    with node.db() as c:
        assert (
            c.execute(
                "update series set last_received_at = ? where series_instance_uid = ?", (stamp(days), uid)
            ).rowcount
            == 1
        )


def instances_of(node, uid: str) -> int:  # type: ignore[no-untyped-def]
    return node.query(
        "select count(*) from instance i join series s on s.id = i.series_fk where s.series_instance_uid = ?", uid
    )[0][0]


def series_rows(node) -> set[str]:  # type: ignore[no-untyped-def]
    return {r[0] for r in node.query("select series_instance_uid from series")}


def assert_consistent(node) -> int:  # type: ignore[no-untyped-def]
    """Index and files agree exactly; counts and parents hold. Returns the number of instances."""
    rows = [r[0] for r in node.query("select file_path from instance")]
    files = [p.relative_to(node.data_dir).as_posix() for p in node.stored_files()]
    assert sorted(rows) == sorted(files), set(rows) ^ set(files)
    assert (
        node.query(
            "select s.series_instance_uid, s.instance_count, count(i.id) from series s "
            "left join instance i on i.series_fk = s.id group by s.id "
            "having s.instance_count != count(i.id)"
        )
        == []
    )
    assert node.query("select id from study where id not in (select study_fk from series)") == []
    assert node.query("select id from patient where id not in (select patient_fk from study)") == []
    assert (
        node.query(
            "select id from delivery where instance_fk is not null and instance_fk not in (select id from instance)"
        )
        == []
    )
    storage = node.data_dir / "storage"
    empty = [d for d in storage.glob("*/*") if d.is_dir() and not any(d.iterdir())]
    assert empty == [], f"series directories left empty: {empty}"
    return len(rows)


def test_old_delivered_series_go_undelivered_ones_stay(node, scp, tmp_path):
    node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
{down(tmp_path)}
[retention]
sources = {{ max_age_days = 30 }}
delivery_history_days = 90
{CT_TO_SCP_MR_TO_DOWN}"""
    fresh = make_ct_series(tmp_path / "fresh", 5)
    node.start()
    for files in (series_files(CT), series_files(MR), fresh):
        assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.deliveries() == {"delivered": 28 + 5, "failed": 35}, 60, "33 delivered, 35 failed")
    ct, mr, new = uid_of(series_files(CT)), uid_of(series_files(MR)), uid_of(fresh)
    make_old(node, ct, 40)
    make_old(node, mr, 45)
    before = assert_consistent(node)
    assert before == 28 + 35 + 5

    # a dry run says what would go and changes nothing
    r = retention_cli(node, "--dry-run")
    assert r.returncode == 0, show(r)
    assert "sources: would delete 1 series, 28 instances" in r.stdout, show(r)
    assert ct in r.stdout and mr not in r.stdout and new not in r.stdout, show(r)
    assert "kept 1 due series" in r.stdout and "deliveries not finished" in r.stdout, show(r)
    assert assert_consistent(node) == before and instances_of(node, ct) == 28

    # the real run (while the node runs): the old delivered CT goes; the old MR that never arrived stays
    r = retention_cli(node)
    assert r.returncode == 0, show(r)
    assert "sources: deleted 1 series, 28 instances" in r.stdout, show(r)
    assert f"retention: deleted series {ct} (sources, 28 instances" in r.stderr, show(r)
    assert "TEST^SYNTHETIC" not in r.stderr + r.stdout
    assert instances_of(node, ct) == 0
    assert instances_of(node, mr) == 35 and instances_of(node, new) == 5
    trail = node.query("SELECT actor, series_uid, detail FROM audit_event WHERE kind = 'series_deleted'")
    assert [(a, u) for a, u, _ in trail] == [("retention", ct)] and "sources, 28 instance(s)" in trail[0][2], trail
    assert assert_consistent(node) == 35 + 5
    assert len(scp.received()) == 33, "the destination keeps what it got"
    # the delivery history stays (younger than delivery_history_days), and with it the CT's series row
    assert node.query("select count(*), min(state), max(state) from delivery where instance_fk is null") == [
        (28, "delivered", "delivered")
    ]
    assert ct in series_rows(node)
    assert "pruned 0 delivery rows" in r.stdout, show(r)

    # once the history is older than delivery_history_days it is pruned, and the empty rows go with it
    with node.db() as c:
        c.execute("update delivery set updated_at = ? where instance_fk is null", (stamp(100),))
        c.execute("update delivery set updated_at = ? where instance_fk is not null", (stamp(100),))
    r = retention_cli(node)
    assert r.returncode == 0, show(r)
    assert "pruned 28 delivery rows" in r.stdout, show(r)
    assert "removed the index rows of 1 empty series, 1 studies" in r.stdout, show(r)
    assert ct not in series_rows(node) and {mr, new} <= series_rows(node)
    assert node.deliveries() == {"delivered": 5, "failed": 35}, "rows of existing instances are never pruned"
    assert assert_consistent(node) == 35 + 5

    # the node goes on receiving the same series again after its rows were removed
    assert storescu(node.port, series_files(CT)).returncode == 0
    wait_for(lambda: instances_of(node, ct) == 28, 30, "the CT stored again")
    assert assert_consistent(node) == 28 + 35 + 5


def test_unfinished_job_protects_its_series(node, tmp_path):
    node.env.update(PLUGINS_PATH)
    node.extra_config = f"""
[tracker]
stable_after = 1
[jobs]
retry_delay = 600
[plugins]
local = {{ flaky = "faulty_plugins:flaky" }}
[retention]
sources = {{ max_age_days = 1 }}
[[rules]]
name = "seg"
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "flaky", params = {{ marker = "{tmp_path / "tried"}" }} }}]
"""
    files = make_ct_series(tmp_path / "ct", 6)
    uid = uid_of(files)
    node.start()
    assert storescu(node.port, files).returncode == 0
    # the plugin failed (retryably) once: the job waits 10 minutes for its next attempt
    wait_for(lambda: node.query("select state, attempts from job") == [("pending", 1)], 60, "a pending job")
    make_old(node, uid, 3)

    r = retention_cli(node)
    assert r.returncode == 0, show(r)
    assert "sources: deleted 0 series" in r.stdout, show(r)
    assert "kept 1 due series" in r.stdout and "a job of it (or making it) is pending or running" in r.stdout, show(r)
    assert instances_of(node, uid) == 6 and assert_consistent(node) == 6

    # an operator cancels the job: nothing protects the series any more; with no history, every row goes
    job = node.query("select id from job")[0][0]
    c = cli(node, "jobs", "cancel", str(job))
    assert c.returncode == 0, show(c)
    r = retention_cli(node)
    assert r.returncode == 0, show(r)
    assert "sources: deleted 1 series, 6 instances" in r.stdout, show(r)
    assert "removed the index rows of 1 empty series, 1 studies, 1 patients" in r.stdout, show(r)
    assert node.query("select count(*) from series") == [(0,)]
    assert node.query("select count(*) from job") == [(0,)]
    assert node.query("select count(*) from patient") == [(0,)]
    assert assert_consistent(node) == 0


def seg_rule(send_to: str) -> str:
    return f"""
[[rules]]
name = "seg"
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "threshold-seg", send_to = ["{send_to}"] }}]
"""


def output_uids(node) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        r[0]
        for r in node.query(
            "select distinct s.series_instance_uid from series s join instance i "
            "on i.series_fk = s.id where i.job_fk is not null"
        )
    ]


def test_scheduler_deletes_old_outputs_and_keeps_sources(node, scp, tmp_path):
    node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
[retention]
enabled = true
interval = 10
outputs = {{ max_age_days = 0.0002 }}
{seg_rule("scp")}
"""
    files = make_ct_series(tmp_path / "ct", 8)
    node.start()
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: output_uids(node), 60, "the SEG stored")
    (seg,) = output_uids(node)
    node.wait_delivered(1)
    # outputs older than ~17 s go at the next scheduled run; the source (kept by age) stays
    wait_for(lambda: not output_uids(node), 60, "the scheduler to delete the SEG", interval=0.5)
    assert f"retention: deleted series {seg} (outputs, 1 instances" in node.log()
    assert instances_of(node, uid_of(files)) == 8
    assert assert_consistent(node) == 8
    assert len(scp.received()) == 1
    # the job that made it and its delivery history stay: the source refers to them
    assert node.query("select state from job") == [("succeeded",)]
    assert node.query("select count(*) from delivery where instance_fk is null") == [(1,)]


def test_source_waits_for_its_outputs_delivery(node, tmp_path):
    node.extra_config = f"""
[tracker]
stable_after = 1
{down(tmp_path)}
[retention]
sources = {{ max_age_days = 1 }}
{seg_rule("down")}
"""
    files = make_ct_series(tmp_path / "ct", 6)
    uid = uid_of(files)
    node.start()
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.deliveries() == {"failed": 1}, 60, "the SEG's delivery to fail")
    make_old(node, uid, 3)
    r = retention_cli(node)
    assert r.returncode == 0, show(r)
    assert "sources: deleted 0 series" in r.stdout, show(r)
    assert "an output made from it is not delivered yet" in r.stdout, show(r)
    assert instances_of(node, uid) == 6 and assert_consistent(node) == 7

    # an operator gives up on that delivery (cancels it): the source may go; the SEG is kept by age
    with node.db() as c:  # what `dicom-node queue cancel` does for queued rows, here for the failed one
        c.execute("update delivery set state = 'cancelled'")
    r = retention_cli(node)
    assert r.returncode == 0, show(r)
    assert "sources: deleted 1 series, 6 instances" in r.stdout, show(r)
    assert instances_of(node, uid) == 0 and len(output_uids(node)) == 1
    assert uid in series_rows(node), "the SEG's lineage still refers to the source's job: its row stays"
    assert assert_consistent(node) == 1


def test_watermark_deletes_oldest_first_and_says_why_it_stops(node, scp, tmp_path, caplog):
    from node.config import load_config
    from node.index.db import make_engine
    from node.storage import Storage
    from node.storage.retention import Retention

    node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
{down(tmp_path)}
[[rules]]
name = "ct"
match = {{ Modality = "CT", SeriesDescription = "synthetic CT" }}
actions = [{{ type = "forward", to = ["scp"] }}]
[[rules]]
name = "kept"
match = {{ Modality = "CT", SeriesDescription = "protected" }}
actions = [{{ type = "forward", to = ["down"] }}]
"""
    node.start()
    series = {name: make_ct_series(tmp_path / name, 10, seed=n) for n, name in enumerate("abc")}
    protected = make_ct_series(tmp_path / "p", 10, seed=9)
    for p in protected:
        ds = pydicom.dcmread(p)
        ds.SeriesDescription = "protected"
        ds.save_as(p)
    for files in (*series.values(), protected):
        assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.deliveries() == {"delivered": 30, "failed": 10}, 60, "30 delivered, 10 failed")
    uids = {name: uid_of(files) for name, files in series.items()}
    # oldest first: the protected series (6 days), then a, b, c
    make_old(node, uid_of(protected), 6)
    for days, name in zip((5, 4, 1), "abc", strict=True):
        make_old(node, uids[name], days)
    assert_consistent(node)

    # The "disk" is the node's storage: 90 % full; freeing 1.5 series' worth reaches the low watermark.
    def stored() -> int:
        return sum(p.stat().st_size for p in node.stored_files())

    one = stored() / 4
    room = stored() / 0.9

    def disk_usage(_path: Path) -> tuple[int, int, int]:
        used = stored()
        return int(room), used, int(room) - used

    low = 100 * (stored() - 1.5 * one) / room
    cfg_text = node.config_path.read_text() + f"[retention]\nhigh_watermark = 80\nlow_watermark = {low:.4f}\n"
    cfg_path = tmp_path / "watermark.toml"
    cfg_path.write_text(cfg_text)
    cfg = load_config(cfg_path, environ={})
    engine, reader = make_engine(cfg.database_url), make_engine(cfg.database_url, write=False)
    try:
        ret = Retention(cfg, engine, Storage(cfg.data_dir), reader=reader, disk_usage=disk_usage)
        dry = ret.run_once(dry_run=True)
        assert dry.series_uids == [uids["a"], uids["b"]] and dry.watermark == "reached"
        assert assert_consistent(node) == 40

        with caplog.at_level(logging.INFO, logger="node.storage.retention"):
            report = ret.run_once()
        # the protected series is the oldest but is skipped; a and b go (oldest first); c is not needed
        assert report.series_uids == [uids["a"], uids["b"]], report.lines()
        assert report.by_watermark == 2 and report.watermark == "reached"
        assert report.deleted["sources"].instances == 20 and report.blocked == {"undelivered": 1}
        assert report.deleted["sources"].bytes == pytest.approx(2 * one, rel=0.05)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert instances_of(node, uids["c"]) == 10 and instances_of(node, uid_of(protected)) == 10
        assert assert_consistent(node) == 20

        # a lower target than what may be deleted: c goes, then it stops and says what blocks it
        caplog.clear()
        cfg.retention.low_watermark = 1
        cfg.retention.high_watermark = 10  # the "disk" is 45 % used now
        with caplog.at_level(logging.INFO, logger="node.storage.retention"):
            report = ret.run_once()
        assert report.series_uids == [uids["c"]] and report.watermark == "not reached", report.lines()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "cannot bring the disk down to low_watermark 1 %" in warnings[0]
        assert "1 series (" in warnings[0] and "deliveries not finished" in warnings[0], warnings[0]
        assert instances_of(node, uid_of(protected)) == 10
        assert assert_consistent(node) == 10
    finally:
        engine.dispose()
        reader.dispose()

    # The real disk, through the command line: a high watermark well below today's use (other programs
    # write and delete on this disk too) and a low one far below: everything eligible goes, the protected
    # series stays, and the log says why it stopped.
    node.stop()
    more = make_ct_series(tmp_path / "d", 4, seed=20)
    node.start()
    assert storescu(node.port, more).returncode == 0
    node.wait_delivered(34)
    make_old(node, uid_of(more), 2)
    usage = shutil.disk_usage(node.data_dir)
    high = math.floor(50 * usage.used / (usage.used + usage.free))
    if high < 2:
        pytest.skip(f"the test filesystem is only {2 * high} % used")
    node.config_path.write_text(
        node.config_path.read_text() + f"[retention]\nhigh_watermark = {high}\nlow_watermark = 1\n"
    )
    r = retention_cli(node)
    assert r.returncode == 0, show(r)
    assert "sources: deleted 1 series, 4 instances" in r.stdout, show(r)
    assert "watermark: not reached" in r.stdout, show(r)
    assert "WARNING" in r.stderr and "cannot bring the disk down to low_watermark 1 %" in r.stderr, show(r)
    assert instances_of(node, uid_of(protected)) == 10 and assert_consistent(node) == 10


def test_retention_on_postgresql(node, scp, tmp_path, postgres_url):  # noqa: F811
    """The same queries and transactions on PostgreSQL: delivered goes, undelivered stays, history pruned."""
    from sqlalchemy import create_engine, text

    node.env = {"DICOM_NODE_DATABASE__URL": postgres_url}
    node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
{down(tmp_path)}
[retention]
sources = {{ max_age_days = 1 }}
{CT_TO_SCP_MR_TO_DOWN}"""
    node.start()
    for name in (CT, MR):
        assert storescu(node.port, series_files(name)).returncode == 0
    ct, mr = uid_of(series_files(CT)), uid_of(series_files(MR))
    engine = create_engine(postgres_url)

    def q(sql: str, **params: object) -> list[tuple]:
        with engine.begin() as c:
            result = c.execute(text(sql), params)
            return [tuple(r) for r in result.all()] if result.returns_rows else []

    def count(uid: str) -> int:
        return q(
            "select count(*) from instance i join series s on s.id = i.series_fk where s.series_instance_uid = :u",
            u=uid,
        )[0][0]

    def consistent() -> int:
        rows = sorted(r[0] for r in q("select file_path from instance"))
        assert rows == sorted(p.relative_to(node.data_dir).as_posix() for p in node.stored_files())
        assert q("select id from study where id not in (select study_fk from series)") == []
        return len(rows)

    try:
        wait_for(
            lambda: dict(q("select state, count(*) from delivery group by state")) == {"delivered": 28, "failed": 35},
            60,
            "28 delivered, 35 failed",
        )
        q("update series set last_received_at = now() - interval '3 days'")
        r = retention_cli(node)
        assert r.returncode == 0, show(r)
        assert "sources: deleted 1 series, 28 instances" in r.stdout and "kept 1 due series" in r.stdout, show(r)
        assert count(ct) == 0 and count(mr) == 35 and consistent() == 35
        q("update delivery set updated_at = now() - interval '100 days'")
        r = retention_cli(node)
        assert r.returncode == 0, show(r)
        assert "pruned 28 delivery rows" in r.stdout and "1 empty series, 1 studies" in r.stdout, show(r)
        assert [u for (u,) in q("select series_instance_uid from series")] == [mr] and consistent() == 35
    finally:
        engine.dispose()
