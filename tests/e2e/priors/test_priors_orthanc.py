"""Priors from a real PACS: Orthanc holds the patient's prior CT study; a new study arrives at the node.

The node asks Orthanc (C-FIND, study level), retrieves the prior by C-MOVE to its own AE title (Orthanc
knows the node as a modality), runs ``volume-change`` on the new series with the prior, and sends the SEG
and the SR (TID 1500) back to Orthanc. The SR's measurements read back (highdicom) equal what the plugin
computes in this process on the same files; a Key Object Selection flags both; dciodvfy finds no error in
the SEG, the SR and the KOS. The retrieved
prior is indexed as such: no rule is evaluated for it, nothing of it is forwarded, retention counts it
as a prior.

The source-down tests: a job waits for a source nobody listens on, deferred with a back-off (no attempt
spent), while another job of the same series (one job worker only) runs; it fails after its
``priors.timeout`` naming the source. And a node restarted while such a job waits takes it up again and
succeeds once the PACS is there.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from helpers import NodeProcess, free_port, storescu, variants, wait_for
from helpers.dciodvfy import verify
from helpers.orthanc import Orthanc

from node.plugins.builtin.threshold import Params
from node.plugins.builtin.volume_change import volume_change
from node.plugins.series import load_priors, load_series

CT = "ct-head"
#: Slices the prior lacks at the top of the head (its bone volume is smaller by what they hold).
DROPPED = 6
PRIOR_DATE = "20130115"  # two years before the real CT (20150206)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@dataclass
class Studies:
    current: list[Path]
    prior: list[Path]
    prior_study_uid: str


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Studies:
    """The real CT head as the new study; the same head under new UIDs, two years before, top slices dropped."""
    root = tmp_path_factory.mktemp("priors-data")
    current = variants.write(variants.load(CT), root / "current")
    prior_sets = variants.make(CT)[:-DROPPED]
    for d in prior_sets:
        d.StudyDate = d.SeriesDate = PRIOR_DATE
        d.pop("AcquisitionDate", None)
        d.pop("ContentDate", None)
    prior = variants.write(prior_sets, root / "prior")
    return Studies(current, prior, str(prior_sets[0].StudyInstanceUID))


def _plugins_config() -> str:
    """volume-change by its entry point when this install lists it, else as a local plugin of the same name."""
    if any(ep.name == "volume-change" for ep in entry_points(group="dicom_node.plugins")):
        return ""
    return '[plugins.local]\n"volume-change" = "node.plugins.builtin.volume_change:volume_change"\n'


def _config(
    source_port: int,
    source_ae: str,
    *,
    timeout: str = "1h",
    extra_rule: str = "",
    workers: int = 2,
    retrieve: str = "move",
    scope: str = "series",
) -> str:
    """The node's config: the source, and rule follow-up running volume-change with priors (a study rule with
    ``scope = "study"``: its one declared input is the CT series, whose plugin gets the priors too)."""
    study = 'scope = "study"\ninputs.ct = { Modality = "CT" }\n' if scope == "study" else ""
    return f"""
[tracker]
stable_after = 1

[jobs]
workers = {workers}
retry_delay = 1

[retention]
priors = {{ max_age_days = 1 }}

{_plugins_config()}
[[sources]]
name = "pacs"
ae_title = "{source_ae}"
host = "127.0.0.1"
port = {source_port}
timeout = 5
retry_delay = 1
max_retry_delay = 2
retrieve = "{retrieve}"

[[rules]]
name = "follow-up"
match = {{ Modality = "CT" }}
{study}[[rules.actions]]
type = "plugin"
plugin = "volume-change"
send_to = ["orthanc"]
key_objects = true
priors = {{ from = "pacs", modality = "CT", within_days = 3650, max = 2, timeout = "{timeout}" }}
{extra_rule}
"""


def _jobs(node: NodeProcess) -> list[tuple]:
    return node.query("select id, rule, state, attempts, last_error, result from job order by id")


def _wait_job(node: NodeProcess, rule: str, states: tuple[str, ...], timeout: float) -> tuple:
    def done() -> tuple | None:
        rows = [j for j in _jobs(node) if j[1] == rule and j[2] in states]
        return rows[0] if rows else None

    return wait_for(done, timeout, f"a job of rule {rule} in {states}\n{_jobs(node)}\n{node.log()[-3000:]}")


def _sr_values(ds: pydicom.Dataset) -> dict[str, dict[str, float]]:
    """{tracking id: {measurement name: value}} of a TID 1500 SR, read with highdicom."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    return {
        g.tracking_identifier: {m.name.meaning: m.value for m in g.get_measurements()}
        for g in sr.content.get_volumetric_roi_measurement_groups()
    }


def _cli(node: NodeProcess, *args: str) -> str:
    """``dicom-node ARGS --config`` on the node's config; its output (it must succeed)."""
    r = subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    """An Orthanc that knows the node (AE and port) as a modality, and the node (not started)."""
    node = NodeProcess(tmp_path / "node")
    orthanc = Orthanc(tmp_path / "orthanc", sender_ports={node.ae_title: node.port})
    try:
        yield orthanc, node
    finally:
        code = node.stop()
        orthanc.stop()
    assert "Traceback" not in node.log(), node.log()[-4000:]
    assert code in (0, None), f"node exited with {code}\n{node.log()[-4000:]}"


@pytest.mark.parametrize("scope", ["series", "study"])
def test_a_prior_from_orthanc_is_retrieved_compared_and_the_seg_and_sr_delivered(
    pacs: tuple[Orthanc, NodeProcess], studies: Studies, tmp_path: Path, scope: str
) -> None:
    """A series rule's job and a study rule's job alike: the prior found, moved, compared; SEG, SR, KOS sent."""
    orthanc, node = pacs
    orthanc.start()
    r = storescu(orthanc.dicom_port, studies.prior, ae=orthanc.aet)
    assert r.returncode == 0, r.stderr
    node.extra_config = _config(orthanc.dicom_port, orthanc.aet, scope=scope) + orthanc.destination("orthanc")
    node.start()

    r = storescu(node.port, studies.current)
    assert r.returncode == 0, r.stderr
    job = _wait_job(node, "follow-up", ("succeeded", "failed"), 180)
    assert job[2] == "succeeded", job
    assert f"priors from pacs: {PRIOR_DATE} (1 series)" in job[5]  # the job's result names what it compared with

    # The prior was recorded before it was moved, and arrived: indexed, marked, no rule, nothing sent.
    [fetch] = node.query("select job_fk, source, study_uid, study_date, state, received from prior_fetch")
    assert fetch == (job[0], "pacs", studies.prior_study_uid, PRIOR_DATE, "retrieved", len(studies.prior))
    audited = node.query("select job_id, called_ae, detail from audit_event where kind = 'prior_retrieved'")
    assert audited == [
        (job[0], orthanc.aet, f"from source 'pacs' by C-MOVE: {len(studies.prior)} sent, {len(studies.prior)} held now")
    ]
    prior_series = node.query(
        "select s.id from series s join study st on st.id = s.study_fk where st.study_instance_uid = ?",
        studies.prior_study_uid,
    )
    assert len(prior_series) == 1
    triggered = "select count(*) from series_revision where series_fk = ? and triggered_at is not null"
    wait_for(lambda: node.query(triggered, prior_series[0][0]) == [(1,)], 30, "the prior series to be evaluated")
    assert node.query("select matched_rules from series_revision where series_fk = ?", prior_series[0][0]) == [("",)]
    assert node.query("select count(*) from job where series_fk = ?", prior_series[0][0]) == [(0,)]
    assert node.query("select count(*) from delivery where series_fk = ?", prior_series[0][0]) == [(0,)]
    assert "a prior study retrieved for a job; no rule is evaluated for it" in node.log()
    # rules explain says why nothing fired; replay (a dry run) does not claim a rule would fire for it.
    prior_uid = str(pydicom.dcmread(studies.prior[0], stop_before_pixels=True).SeriesInstanceUID)
    explained = _cli(node, "rules", "explain", prior_uid)
    assert "its study is a prior retrieved from a [[sources]] PACS for a job" in explained
    replayed = _cli(node, "rules", "replay", "--since", "2000-01-01")
    assert f"series {prior_uid}: a prior study retrieved for a job (docs/priors.md): no rule" in replayed

    # SEG and SR made by the job, delivered to Orthanc, valid, and the SR says what the plugin measured.
    node.wait_delivered(timeout=60)
    outputs = dict(node.query("select sop_class_uid, sop_instance_uid from instance where job_fk = ?", job[0]))
    assert set(outputs) == {SEG_CLASS, SR_CLASS, KOS_CLASS}, outputs
    files = {}
    for cls, uid in outputs.items():
        assert orthanc.has_instance(uid)
        files[cls] = tmp_path / f"{uid}.dcm"
        files[cls].write_bytes(orthanc.file(uid))
        verify(files[cls], f"volume-change {cls}")
    series = load_series(studies.current)
    series.priors = load_priors(
        [{"study_uid": studies.prior_study_uid, "study_date": PRIOR_DATE, "series": [[str(p) for p in studies.prior]]}]
    )
    _seg, expected = volume_change(series, Params())
    want = {g.tracking_id: {m.name.meaning: m.value for m in g.measurements} for g in expected.groups}
    got = _sr_values(pydicom.dcmread(files[SR_CLASS]))
    assert got.keys() == want.keys() == {"Bone"}
    assert got["Bone"] == pytest.approx(want["Bone"], rel=1e-9)
    assert got["Bone"]["Volume in prior study"] < got["Bone"]["Volume"]  # the prior lacks the top slices
    seg = pydicom.dcmread(files[SEG_CLASS], stop_before_pixels=True)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(files[SR_CLASS]))
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    # The Key Object Selection flags the SEG and the SR for the reading radiologist.
    kos = pydicom.dcmread(files[KOS_CLASS])
    flagged = {
        ref.ReferencedSOPInstanceUID
        for item in kos.CurrentRequestedProcedureEvidenceSequence
        for series_item in item.ReferencedSeriesSequence
        for ref in series_item.ReferencedSOPSequence
    }
    assert flagged == {outputs[SEG_CLASS], outputs[SR_CLASS]}

    # Retention: the prior goes by [retention] priors (1 day here), the new study's series stay.
    old_day = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with node.db() as db:
        db.execute("update series set last_received_at = ? where id = ?", (old_day, prior_series[0][0]))
    cleaned = _cli(node, "retention")
    assert f"priors: deleted 1 series, {len(studies.prior)} instances" in cleaned
    assert "sources: deleted 0 series" in cleaned
    assert node.query("select count(*) from series where id = ?", prior_series[0][0]) in ([(0,)], [(1,)])
    assert node.query(
        "select count(*) from instance i join series s on s.id = i.series_fk where s.id = ?", prior_series[0][0]
    ) == [(0,)]


def test_a_source_that_is_down_defers_the_job_with_back_off_until_its_timeout_without_holding_others(
    node: NodeProcess, studies: Studies
) -> None:
    down = free_port()  # nothing listens there
    other_rule = """
[[rules]]
name = "plain"
match = { Modality = "CT" }
[[rules.actions]]
type = "plugin"
plugin = "threshold-seg"
"""
    unused = f'[[destinations]]\nname = "orthanc"\nae_title = "NOBODY"\nhost = "127.0.0.1"\nport = {free_port()}\n'
    node.extra_config = _config(down, "NOBODY", timeout="15s", extra_rule=other_rule, workers=1) + unused
    node.start()
    r = storescu(node.port, studies.current)
    assert r.returncode == 0, r.stderr
    # The other job of the series runs although the one worker's first job is waiting for the PACS.
    plain = _wait_job(node, "plain", ("succeeded", "failed"), 120)
    assert plain[2] == "succeeded", plain
    waiting = _jobs(node)[0]
    assert waiting[1] == "follow-up"
    failed = _wait_job(node, "follow-up", ("failed",), 60)
    _id, _rule, _state, attempts, error, _result = failed
    assert attempts == 1  # the waits were no attempts; the last try, after the timeout, is the one failure
    assert "source 'pacs' (NOBODY at 127.0.0.1" in error and "no connection" in error, error
    assert "priors.timeout = 15 s" in error, error
    # Retried with a growing back-off: each wait is logged with when it tries again.
    waits = re.findall(r"job \d+: waiting for priors: .*?trying again at (\S+ \S+) UTC", node.log())
    assert len(waits) >= 2, node.log()[-3000:]
    assert node.query("select count(*) from prior_fetch") == [(0,)]  # nothing was found, so nothing retrieved
    # It ran while the other waited: it ended before the waiting job gave up.
    [(plain_end, follow_end)] = node.query(
        "select p.finished_at, f.finished_at from job p, job f where p.rule = 'plain' and f.rule = 'follow-up'"
    )
    assert plain_end < follow_end


def test_a_study_rules_job_waiting_for_its_source_survives_a_restart_and_resumes_once_the_pacs_answers(
    pacs: tuple[Orthanc, NodeProcess], studies: Studies
) -> None:
    orthanc, node = pacs
    node.extra_config = _config(orthanc.dicom_port, orthanc.aet, timeout="10m", scope="study") + orthanc.destination(
        "orthanc"
    )
    node.start()
    r = storescu(node.port, studies.current)
    assert r.returncode == 0, r.stderr

    def deferred() -> bool:
        rows = _jobs(node)
        return bool(rows) and rows[0][2] == "pending" and "waiting for priors" in rows[0][4]

    wait_for(deferred, 60, f"the job to wait for the PACS\n{_jobs(node)}")
    assert node.stop() == 0
    with sqlite3.connect(node.data_dir / "index.sqlite") as db:
        [(state, attempts)] = db.execute("select state, attempts from job").fetchall()
    assert (state, attempts) == ("pending", 0)

    orthanc.start()
    r = storescu(orthanc.dicom_port, studies.prior, ae=orthanc.aet)
    assert r.returncode == 0, r.stderr
    node.start()
    job = _wait_job(node, "follow-up", ("succeeded", "failed"), 120)
    assert job[2] == "succeeded", job
    assert node.query("select state, received from prior_fetch") == [("retrieved", len(studies.prior))]
    assert node.query("select count(*) from study_trigger") == [(1,)]  # the prior study fired no study rule
    # The plugin of the study rule's job got the prior: its report holds the prior's volume.
    [(sr_path,)] = node.query("select file_path from instance where job_fk = ? and sop_class_uid = ?", job[0], SR_CLASS)
    got = _sr_values(pydicom.dcmread(node.data_dir / sr_path))
    assert set(got["Bone"]) == {
        "Volume",
        "Volume in prior study",
        "Volume change since prior study",
        "Fractional Change",
    }


def test_with_retrieve_get_the_prior_comes_on_the_nodes_own_association(tmp_path: Path, studies: Studies) -> None:
    """C-GET: the source needs no route back to the node (this Orthanc has the node's AE on port 104, so a
    C-MOVE to it could not arrive); the instances go through the node's C-STORE write path all the same."""
    node = NodeProcess(tmp_path / "node")
    with Orthanc(tmp_path / "orthanc") as orthanc:
        r = storescu(orthanc.dicom_port, studies.prior, ae=orthanc.aet)
        assert r.returncode == 0, r.stderr
        node.extra_config = _config(orthanc.dicom_port, orthanc.aet, retrieve="get") + orthanc.destination("orthanc")
        node.start()
        try:
            r = storescu(node.port, studies.current)
            assert r.returncode == 0, r.stderr
            job = _wait_job(node, "follow-up", ("succeeded", "failed"), 180)
            assert job[2] == "succeeded", job
            assert node.query("select state, received from prior_fetch") == [("retrieved", len(studies.prior))]
            stored = node.query(
                "select count(*), min(i.calling_ae) from instance i join series s on s.id = i.series_fk "
                "join study st on st.id = s.study_fk where st.study_instance_uid = ?",
                studies.prior_study_uid,
            )
            assert stored == [(len(studies.prior), orthanc.aet)]
            assert "by C-GET" in node.log()
        finally:
            code = node.stop()
    assert "Traceback" not in node.log(), node.log()[-4000:]
    assert code == 0, node.log()[-3000:]


def test_a_source_that_does_not_know_the_node_is_waited_for_with_the_reason(tmp_path: Path, studies: Studies) -> None:
    """Orthanc drops a query from an AE title it does not know (no failure status): the job waits, saying why."""
    node = NodeProcess(tmp_path / "node")
    with Orthanc(tmp_path / "orthanc", senders=("STORESCU",)) as orthanc:
        node.extra_config = _config(orthanc.dicom_port, orthanc.aet) + orthanc.destination("orthanc")
        node.start()
        try:
            r = storescu(node.port, studies.current)
            assert r.returncode == 0, r.stderr

            def waiting() -> tuple | None:
                rows = [j for j in _jobs(node) if j[2] == "pending" and "waiting for priors" in j[4]]
                return rows[0] if rows else None

            job = wait_for(waiting, 90, f"the job to wait for the source\n{_jobs(node)}")
            assert job[3] == 0  # no attempt spent
            assert "the C-FIND ended with no response" in job[4], job[4]
            assert "does the source allow this node's AE title DICOM_NODE to query and retrieve" in job[4], job[4]
            assert "trying again at" in job[4]
        finally:
            code = node.stop()
    assert "Traceback" not in node.log(), node.log()[-4000:]
    assert code == 0, node.log()[-3000:]


def test_a_move_the_source_cannot_deliver_fails_the_job_after_its_timeout_and_the_fetch_stays_failed(
    tmp_path: Path, studies: Studies
) -> None:
    """The PACS finds the prior but has the node at a wrong port (its C-MOVE cannot reach it): the job waits
    with the source's answer, then fails after priors.timeout; the prior_fetch row says failed, with why."""
    node = NodeProcess(tmp_path / "node")
    with Orthanc(tmp_path / "orthanc") as orthanc:  # knows DICOM_NODE, but at port 104
        r = storescu(orthanc.dicom_port, studies.prior, ae=orthanc.aet)
        assert r.returncode == 0, r.stderr
        node.extra_config = _config(orthanc.dicom_port, orthanc.aet, timeout="6s") + orthanc.destination("orthanc")
        node.start()
        try:
            r = storescu(node.port, studies.current)
            assert r.returncode == 0, r.stderr
            job = _wait_job(node, "follow-up", ("failed", "succeeded"), 120)
        finally:
            code = node.stop()
    assert job[2] == "failed", job
    assert "the C-MOVE of study " + studies.prior_study_uid in job[4] and "priors.timeout = 6 s" in job[4], job[4]
    assert "the source's entry for it must name this node's host and DICOM port" in job[4], job[4]
    [(state, error)] = node.query("select state, error from prior_fetch")
    assert state == "failed" and "C-MOVE" in error, error
    assert "Traceback" not in node.log(), node.log()[-4000:]
    assert code == 0, node.log()[-3000:]
