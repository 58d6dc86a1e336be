"""Series completion and jobs, end to end: DCMTK storescu sends, the node decides, DCMTK storescp receives.

Times in the index are UTC text; the assertions compare them as datetimes.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from helpers import StoreSCP, dataset_bytes, make_ct_series, read_sop_uid, series_files, storescu, wait_for

CT = "ct-head-philips-5mm"
MR = "mr-t1-sag-siemens"


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def jobs(node) -> list[tuple]:  # type: ignore[no-untyped-def]
    return node.query(
        "select j.id, s.series_instance_uid, j.revision, j.rule, j.action_index, j.state, j.attempts, "
        "j.created_at, j.started_at, j.result from job j join series s on s.id = j.series_fk "
        "order by j.id"
    )


def series_row(node, uid: str) -> tuple:  # type: ignore[no-untyped-def]
    return node.query(
        "select id, state, revision, revision_instances, last_received_at, instance_count "
        "from series where series_instance_uid = ?",
        uid,
    )[0]


def uid_of(name: str) -> str:
    import pydicom

    return str(pydicom.dcmread(series_files(name)[0], stop_before_pixels=True).SeriesInstanceUID)


def forward_ct(scp: StoreSCP, *, stable_after: int, expected_counts: bool = True) -> str:
    """The config most tests here use: rule "ct" forwards every CT series to ``scp``."""
    return f"""
[tracker]
stable_after = {stable_after}
use_expected_counts = {str(expected_counts).lower()}
{scp.destination()}
[[rules]]
name = "ct"
match = {{ Modality = "CT" }}
actions = [{{ type = "forward", to = ["scp"] }}]
"""


@pytest.fixture
def scp(tmp_path: Path):
    s = StoreSCP(tmp_path / "scp-out").start()
    yield s
    s.stop()


@pytest.fixture
def scp2(tmp_path: Path):
    s = StoreSCP(tmp_path / "scp2-out", ae_title="STORESCP2").start()
    yield s
    s.stop()


def test_matching_series_triggers_one_job_per_action_after_stable_after(node, scp, scp2):
    node.extra_config = f"""
[tracker]
stable_after = 2
{scp.destination("scp")}
{scp2.destination("scp2")}
[[rules]]
name = "ct-forward"
match = {{ Modality = "CT", ImageType = {{ contains = "ORIGINAL" }} }}
actions = [{{ type = "forward", to = ["scp"] }}, {{ type = "forward", to = ["scp2"] }}]
"""
    node.start()
    assert storescu(node.port, series_files(CT)).returncode == 0
    assert storescu(node.port, series_files(MR)).returncode == 0
    ct, mr = uid_of(CT), uid_of(MR)
    wait_for(
        lambda: len(node.query("select * from series_revision where triggered_at is not null")) == 2,
        20,
        "both series to be evaluated",
    )
    wait_for(lambda: all(j[5] == "succeeded" for j in jobs(node)), 60, "the jobs to finish")
    node.wait_delivered(56)
    rows = jobs(node)
    # exactly one job per action, none for the MR series
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [(ct, 1, "ct-forward", 0), (ct, 1, "ct-forward", 1)]
    last = ts(series_row(node, ct)[4])
    for r in rows:
        assert ts(r[7]) - last >= dt.timedelta(seconds=2), "a job was made before the series was stable"
    revs = dict(
        node.query(
            "select s.series_instance_uid, r.matched_rules from series_revision r join series s on s.id = r.series_fk"
        )
    )
    assert revs == {ct: "ct-forward", mr: ""}
    # the outputs: both peers hold exactly the CT series, byte for byte as sent
    sent = {read_sop_uid(p): dataset_bytes(p) for p in series_files(CT)}
    for peer in (scp, scp2):
        got = {read_sop_uid(p): dataset_bytes(p) for p in peer.received()}
        assert got == sent
    # a little later: still exactly two jobs (nothing fires twice)
    time.sleep(3)
    assert len(jobs(node)) == 2
    assert "no rule matched" in node.log()


def test_series_in_three_associations_with_short_pauses_triggers_once(node, scp):
    node.extra_config = forward_ct(scp, stable_after=3, expected_counts=False)
    node.start()
    files = series_files(CT)
    t_first = time.monotonic()
    for part in (files[:10], files[10:20], files[20:]):
        assert storescu(node.port, part).returncode == 0
        time.sleep(1.0)  # shorter than stable_after
    uid = uid_of(CT)
    wait_for(lambda: jobs(node) and jobs(node)[0][5] == "succeeded", 30, "the job to succeed")
    assert time.monotonic() - t_first >= 3
    node.wait_delivered(28)
    time.sleep(3.5)  # longer than stable_after: a second trigger would show now
    rows = jobs(node)
    assert len(rows) == 1 and rows[0][1] == uid and rows[0][2] == 1
    assert node.query("select revision, instance_count from series_revision") == [(1, 28)]
    assert len(scp.received()) == 28


def test_pause_longer_than_stable_after_opens_revision_2(node, scp, scp2):
    node.extra_config = f"""
[tracker]
stable_after = 1
use_expected_counts = false
{scp.destination("scp")}
{scp2.destination("scp2")}
[[rules]]
name = "first-only"
match = {{ Modality = "CT" }}
actions = [{{ type = "forward", to = ["scp"] }}]
[[rules]]
name = "every-revision"
on_revision = "rerun"
match = {{ Modality = "CT" }}
actions = [{{ type = "forward", to = ["scp2"] }}]
"""
    node.start()
    files = series_files(CT)
    uid = uid_of(CT)
    assert storescu(node.port, files[:20]).returncode == 0
    wait_for(lambda: len(jobs(node)) == 2 and all(j[5] == "succeeded" for j in jobs(node)), 30, "revision 1 jobs")
    assert series_row(node, uid)[1:4] == ("triggered", 1, 20)
    assert storescu(node.port, files[20:]).returncode == 0
    assert series_row(node, uid)[1:4] == ("receiving", 2, 8)
    wait_for(
        lambda: len(node.query("select * from series_revision where revision = 2 and triggered_at is not null")),
        20,
        "revision 2 to be evaluated",
    )
    wait_for(lambda: all(j[5] == "succeeded" for j in jobs(node)), 30, "the jobs to finish")
    node.wait_delivered(48)
    rows = [(r[2], r[3]) for r in jobs(node)]
    assert rows == [(1, "first-only"), (1, "every-revision"), (2, "every-revision")]
    assert node.query("select revision, instance_count, matched_rules from series_revision order by revision") == [
        (1, 20, "first-only,every-revision"),
        (2, 8, "every-revision"),
    ]
    # "first-only" forwarded revision 1 only; "every-revision" forwarded each revision's own instances
    assert len(scp.received()) == 20
    assert {read_sop_uid(p) for p in scp2.received()} == {read_sop_uid(p) for p in files}
    assert [r[9] for r in jobs(node)] == [
        "queued 20 instance(s) for scp",
        "queued 20 instance(s) for scp2",
        "queued 8 instance(s) for scp2",
    ]


def test_expected_count_completes_a_series_before_the_quiet_period(node, scp, tmp_path):
    files = make_ct_series(tmp_path / "ct", 12, images_in_acquisition=12)
    node.extra_config = forward_ct(scp, stable_after=60)
    node.start()
    t0 = time.monotonic()
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: jobs(node), 20, "a job well before stable_after = 60 s")
    assert time.monotonic() - t0 < 20
    reason = node.query("select stable_reason from series_revision")[0][0]
    assert reason == "12 of 12 expected instances (ImagesInAcquisition = 12)"


def test_rule_overrides_stable_after_and_expected_count(node, scp, tmp_path):
    ct = make_ct_series(tmp_path / "ct", 6)
    node.extra_config = f"""
[tracker]
stable_after = 60
{scp.destination()}
[[rules]]
name = "ct-six"
expected_instances = 6
match = {{ Modality = "CT", instances = 6 }}
actions = [{{ type = "forward", to = ["scp"] }}]
[[rules]]
name = "mr-quick"
stable_after = 1
match = {{ Modality = "MR" }}
actions = [{{ type = "forward", to = ["scp"] }}]
"""
    node.start()
    assert storescu(node.port, ct).returncode == 0
    assert storescu(node.port, series_files(MR)).returncode == 0
    wait_for(lambda: len(jobs(node)) == 2, 20, "both series to trigger long before 60 s")
    reasons = sorted(r[0] for r in node.query("select stable_reason from series_revision"))
    assert reasons == [
        "6 of 6 expected instances (expected_instances = 6 of rule 'ct-six')",
        "no instance for 1 s, rule 'mr-quick'",
    ]


@pytest.mark.parametrize("overdue", [False, True], ids=["restart-before-due", "restart-after-due"])
def test_kill9_while_waiting_for_stability_triggers_once(node, scp, overdue):
    node.extra_config = forward_ct(scp, stable_after=4, expected_counts=False)
    node.start()
    assert storescu(node.port, series_files(CT)).returncode == 0
    uid = uid_of(CT)
    node.kill9()
    last = ts(series_row(node, uid)[4])
    assert jobs(node) == []
    if overdue:
        time.sleep(5)  # the deadline passes while the node is down
    node.start()
    t_started = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    wait_for(lambda: jobs(node), 20, "the series to trigger after the restart")
    created = ts(jobs(node)[0][7])
    if overdue:
        assert created - t_started < dt.timedelta(seconds=2), "an overdue series must fire at once"
    else:
        assert created - last >= dt.timedelta(seconds=4), "fired before stable_after"
        due = max(last + dt.timedelta(seconds=4), t_started)  # a slow restart (a loaded host) may start past it
        assert created - due < dt.timedelta(seconds=3), "fired late"
    wait_for(lambda: jobs(node)[0][5] == "succeeded", 30, "the job to succeed")
    time.sleep(1)
    assert len(jobs(node)) == 1
    assert "re-armed from the index" in node.log()


def test_kill9_during_delivery_sends_the_rest_after_restart(node, scp, tmp_path):
    files = make_ct_series(tmp_path / "ct", 200, rows=256, cols=256)
    node.extra_config = forward_ct(scp, stable_after=1, expected_counts=False)
    node.start()
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: len(scp.received()) >= 20, 30, "the delivery to be under way", interval=0.01)
    node.kill9()
    partial = len(scp.received())
    assert partial < 200, "the delivery finished before the kill; make the series bigger"
    assert jobs(node)[0][5] == "succeeded"  # the forward job only queues
    assert node.deliveries().get("delivered", 0) < 200
    node.start()
    assert node.wait_delivered(200) == {"delivered": 200}
    assert len(jobs(node)) == 1
    assert "deliveries were being sent by a node process that is gone: sending them again" in node.log()
    # every instance arrived (storescp names files by SOP Instance UID)
    got = [read_sop_uid(p) for p in scp.received()]
    assert len(got) == 200 and set(got) == {read_sop_uid(p) for p in files}


def test_stable_revision_without_jobs_is_evaluated_at_start_up(node, scp):
    """A crash between "stable" and making its jobs: the next start evaluates it once."""
    node.extra_config = forward_ct(scp, stable_after=1)
    node.start()
    assert storescu(node.port, series_files(CT)).returncode == 0
    wait_for(lambda: jobs(node) and jobs(node)[0][5] == "succeeded", 30, "the first job")
    node.stop()
    with node.db() as c:  # put the index back to the moment after "stable", before the jobs were made
        c.execute("delete from job")
        c.execute("update series_revision set triggered_at = null, matched_rules = ''")
        c.execute("update series set state = 'stable'")
    node.start()
    wait_for(lambda: jobs(node) and jobs(node)[0][5] == "succeeded", 30, "the job made at start-up")
    time.sleep(1)
    assert len(jobs(node)) == 1
    assert node.query("select state from series") == [("triggered",)]


def test_forward_then_discard_deletes_only_after_delivery(node, scp, tmp_path):
    down = StoreSCP(tmp_path / "never", ae_title="DOWN")  # never started: its port refuses connections
    node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
{down.destination("down", retry="{ initial_delay = 0.2, max_delay = 0.5, give_up_after = 3 }")}
[jobs]
retry_delay = 0
[[rules]]
name = "ct-route-and-delete"
match = {{ Modality = "CT" }}
actions = [{{ type = "forward", to = ["scp"] }}, {{ type = "discard" }}]
[[rules]]
name = "mr-route-and-delete"
max_attempts = 1
match = {{ Modality = "MR" }}
actions = [{{ type = "forward", to = ["down"] }}, {{ type = "discard" }}]
"""
    node.start()
    assert storescu(node.port, series_files(CT)).returncode == 0
    assert storescu(node.port, series_files(MR)).returncode == 0
    wait_for(
        lambda: len(jobs(node)) == 4 and all(j[5] in ("succeeded", "failed") for j in jobs(node)),
        60,
        "all four jobs to end",
    )
    node.wait_delivered(28)
    states = {(r[3], r[4]): (r[5], r[9]) for r in jobs(node)}
    assert states[("ct-route-and-delete", 0)] == ("succeeded", "queued 28 instance(s) for scp")
    assert states[("ct-route-and-delete", 1)] == ("succeeded", "discarded 28 instances (28 files removed)")
    assert len(scp.received()) == 28
    # the MR never reached its destination (the discard waited until its deliveries gave up): it is still here
    assert states[("mr-route-and-delete", 0)][0] == "succeeded"
    assert states[("mr-route-and-delete", 1)][0] == "failed"
    assert node.query("select distinct state from delivery where destination = 'down'") == [("failed",)]
    err = node.query("select last_error from job where rule = 'mr-route-and-delete' and action_index = 1")[0][0]
    assert err.startswith("not discarding: deliveries") and "35 failed for down" in err and "kept" in err
    assert series_row(node, uid_of(MR))[5] == 35 and len(node.stored_files()) == 35
    assert series_row(node, uid_of(CT))[5] == 0
