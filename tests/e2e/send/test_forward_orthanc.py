"""Forwarding to a real Orthanc (the Debian package) as the downstream PACS, through the durable queue.

Each test starts its own Orthanc on loopback ports; what Orthanc holds is read back through its REST API.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import SHARED, StoreSCP, make_ct_series, read_sop_uid, series_files, storescu, wait_for
from helpers.orthanc import Orthanc

from node.send.scu import Peer, send_files

CT = "ct-head-philips-5mm"  # 28 axial CT images
ONE_SLICE = SHARED / "transfer-syntaxes" / "one-mr-slice"


@pytest.fixture
def orthanc(tmp_path: Path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


def forward_all(destination: str, *, expected_counts: bool = True) -> str:
    """Config: a series is stable 1 s after its last instance; one rule forwards every series to ``pacs``."""
    counts = "" if expected_counts else "use_expected_counts = false\n"
    return (
        f'[tracker]\nstable_after = 1\n{counts}{destination}\n[[rules]]\nname = "route"\n'
        'actions = [{ type = "forward", to = ["pacs"] }]\n'
    )


def deliveries(node, destination: str) -> list[tuple]:  # type: ignore[no-untyped-def]
    return node.query(
        "select sop_instance_uid, state, attempts, last_status, last_error, warning from delivery "
        "where destination = ? order by id",
        destination,
    )


def test_a_matched_series_sends_seg_sc_and_source_to_orthanc(node, orthanc):
    """Rule -> plugins -> SEG and SC (and the source series) in Orthanc, with the right study and references."""
    orthanc.start()
    node.extra_config = f"""
[tracker]
stable_after = 1
{orthanc.destination("pacs")}
[[rules]]
name = "ct-ai"
match = {{ Modality = "CT" }}
[[rules.actions]]
type = "plugin"
plugin = "threshold-seg"
send_to = ["pacs"]
[[rules.actions]]
type = "plugin"
plugin = "mip-sc"
send_to = ["pacs"]
[[rules.actions]]
type = "forward"
to = ["pacs"]
"""
    node.start()
    files = series_files(CT)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.query("select count(*) from job where state = 'succeeded'") == [(3,)], 120, "three jobs")
    outputs = node.query("select i.sop_instance_uid, i.sop_class_uid from instance i where i.job_fk is not null")
    assert len(outputs) >= 2
    node.wait_delivered(28 + len(outputs))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert orthanc.count() == 28 + len(outputs)
    for uid in map(read_sop_uid, files):
        assert orthanc.has_instance(uid)
    seg_class, sc_class = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"
    classes = {c for _, c in outputs}
    assert seg_class in classes and sc_class in classes, classes
    for uid, sop_class in outputs:
        tags = orthanc.tags(uid)
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID, "derived objects belong to the source's study"
        assert tags["SeriesInstanceUID"] != source.SeriesInstanceUID, "in a series of their own"
        assert tags["PatientID"] == source.PatientID
        ds = pydicom.dcmread(io.BytesIO(orthanc.file(uid)))
        if sop_class == seg_class:
            refs = {r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence}
            assert refs == {source.SeriesInstanceUID}
            referenced = {
                i.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence for i in r.ReferencedInstanceSequence
            }
            assert referenced <= {read_sop_uid(f) for f in files} and referenced
    assert {r[1] for r in deliveries(node, "pacs")} == {"delivered"}

    # -- the chain, as an administrator asks for it: from any output back to its source and on to the PACS
    seg_uid = next(uid for uid, c in outputs if c == seg_class)
    r = subprocess.run(
        [sys.executable, "-m", "node", "lineage", seg_uid, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert f"{seg_uid} was made by this node from series {source.SeriesInstanceUID}" in text, r.stdout
    assert "(plugin threshold-seg 1.0): succeeded" in text and f"output Segmentation Storage {seg_uid}" in text
    assert "(forward): succeeded" in text and "-> pacs: 28 delivered" in text, r.stdout
    assert text.count("-> pacs: 1 delivered") == len(outputs), r.stdout


def test_orthanc_outage_is_ridden_out_with_backoff_while_storescp_keeps_receiving(node, orthanc, tmp_path):
    orthanc.start()
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        node.extra_config = f"""
[tracker]
stable_after = 1
use_expected_counts = false
{orthanc.destination("pacs", retry="{ initial_delay = 1, max_delay = 8, multiplier = 2, jitter = 0.1 }")}
{scp.destination("archive")}
[[rules]]
name = "route"
actions = [{{ type = "forward", to = ["pacs"] }}, {{ type = "forward", to = ["archive"] }}]
"""
        node.start()
        first = make_ct_series(tmp_path / "a", 10, seed=1)
        assert storescu(node.port, first).returncode == 0
        node.wait_delivered(20)
        assert orthanc.count() == 10
        # -- Orthanc goes down; new series keep arriving
        orthanc.stop()
        t_down = time.monotonic()
        second = make_ct_series(tmp_path / "b", 12, seed=2)
        third = make_ct_series(tmp_path / "c", 8, seed=3)
        assert storescu(node.port, second).returncode == 0
        time.sleep(2)
        assert storescu(node.port, third).returncode == 0
        # the other destination is not held up by the dead one
        wait_for(lambda: len(scp.received()) == 30, 20, "storescp to receive every series meanwhile")
        assert time.monotonic() - t_down < 25
        assert node.query("select count(*) from delivery where destination = 'pacs' and state = 'queued'") == [(20,)]
        time.sleep(max(0.0, 30 - (time.monotonic() - t_down)))
        # -- 30 s later Orthanc is back (same storage, same port)
        orthanc.start()
        node.wait_delivered(60, timeout=30)
    finally:
        scp.stop()
    assert orthanc.count() == 30
    assert orthanc.new_instance_events() == 30, "no instance was stored twice"
    rows = deliveries(node, "pacs")
    assert {r[1] for r in rows} == {"delivered"}
    retried = [r[2] for r in rows[10:]]
    assert min(retried) >= 3, f"each waiting delivery was tried several times: {retried}"
    # the back-off grew (1, 2, 4, 8 s, give or take 10 %) and stayed at its maximum
    delays = [
        float(d) for d in re.findall(r"destination pacs: .* consecutive failure\(s\), next try in (\d+) s", node.log())
    ]
    assert len(delays) >= 4 and delays[:4] == sorted(delays[:4]) and delays[0] <= 1.1 and max(delays) <= 8.8, delays
    assert all(r[2] == 1 for r in deliveries(node, "archive")), "storescp got everything at the first attempt"


def test_kill9_mid_delivery_of_200_instances_then_orthanc_holds_all(node, orthanc, tmp_path):
    orthanc.start()
    files = make_ct_series(tmp_path / "ct", 200, rows=512, cols=512)
    node.extra_config = forward_all(orthanc.destination("pacs", max_associations="1"), expected_counts=False)
    node.start()
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: orthanc.count() >= 20, 60, "the delivery to be under way", interval=0.05)
    node.kill9()
    held = orthanc.count()
    assert held < 200, "everything arrived before the kill; make the series bigger"
    node.start()
    node.wait_delivered(200, timeout=120)
    assert orthanc.count() == 200
    assert {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in orthanc.get("/instances?expand")} == {
        read_sop_uid(f) for f in files
    }
    assert "deliveries were being sent by a node process that is gone: sending them again" in node.log()


def test_a_destination_that_refuses_our_calling_ae_fails_once_with_the_reason(node, orthanc, tmp_path):
    orthanc.start()  # knows DICOM_NODE and STORESCU, not INTRUDER
    node.extra_config = forward_all(
        orthanc.destination("pacs", calling_ae_title='"INTRUDER"', retry="{ initial_delay = 0.5 }")
    )
    node.start()
    files = make_ct_series(tmp_path / "ct", 40, seed=4)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.deliveries() == {"failed": 40}, 30, "every delivery to fail")
    time.sleep(3)  # long enough for several retries, were it retried
    rows = deliveries(node, "pacs")
    assert {r[1] for r in rows} == {"failed"} and {r[2] for r in rows} == {1}, "failed once, not retried"
    assert all("refuses us" in r[4] and "'INTRUDER'" in r[4] for r in rows), rows[0][4]
    assert orthanc.count() == 0
    assert node.log().count("aborted the association instead of answering") >= 1


def test_a_sop_class_the_destination_does_not_support_fails_once(node, tmp_path):
    pacs = Orthanc(tmp_path / "orthanc", unknown_sop_class_accepted=False).start()
    try:
        node.extra_config = forward_all(pacs.destination("pacs", retry="{ initial_delay = 0.5 }"))
        node.start()
        files = make_ct_series(tmp_path / "ct", 3, seed=5)
        # the same image under a storage SOP class newer than Orthanc 1.10 (Photoacoustic Image Storage, 2022)
        odd = pydicom.dcmread(files[0])
        odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.3"
        odd.save_as(files[0], enforce_file_format=True)
        assert send_files(Peer("127.0.0.1", node.port, node.ae_title, "MODALITY"), files).sent == 3
        node.wait_delivered(2)
        time.sleep(2)
        rows = {r[0]: r for r in deliveries(node, "pacs")}
        bad = rows[read_sop_uid(files[0])]
        assert bad[1:4] == ("failed", 1, 0x0122) and "does not support the SOP class" in bad[4], bad
        assert pacs.count() == 2
    finally:
        pacs.stop()


def test_destination_asking_for_jpeg2000_gets_lossless_reencoded_instances(node, orthanc, tmp_path):
    orthanc.start()
    files = make_ct_series(tmp_path / "ct", 4, rows=128, cols=128, seed=6)
    node.extra_config = forward_all(orthanc.destination("pacs", transfer_syntax='"jpeg2000"'))
    node.start()
    assert storescu(node.port, files).returncode == 0
    node.wait_delivered(4)
    for f in files:
        uid = read_sop_uid(f)
        oid = orthanc.find_instance(uid)
        assert orthanc.get(f"/instances/{oid}/metadata/TransferSyntax").decode() == "1.2.840.10008.1.2.4.90"
        got = pydicom.dcmread(io.BytesIO(orthanc.file(uid)))
        np.testing.assert_array_equal(got.pixel_array, pydicom.dcmread(f).pixel_array)
        assert got.SOPInstanceUID == uid


def test_storage_commitment_with_orthanc(node, tmp_path):
    pacs = Orthanc(tmp_path / "orthanc", sender_ports={"DICOM_NODE": node.port}).start()
    try:
        node.extra_config = forward_all(pacs.destination("pacs", storage_commitment="true"))
        node.start()
        files = make_ct_series(tmp_path / "ct", 6, seed=7)
        assert storescu(node.port, files).returncode == 0
        node.wait_delivered(6)
        wait_for(
            lambda: node.query("select distinct commitment from delivery") == [("committed",)],
            30,
            "Orthanc to confirm the storage commitment",
        )
        assert pacs.count() == 6
        assert "storage commitment result for transaction" in node.log()
    finally:
        pacs.stop()


def test_storage_commitment_failures_and_silence_are_sent_again(node, tmp_path):
    """A PACS reports one instance as not committed and never answers for the rest: both are sent again."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import StorageCommitmentPushModel

    # Orthanc calls back a wrong port, so its own reports never arrive: this test speaks for the PACS.
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        node.extra_config = forward_all(pacs.destination("pacs", storage_commitment="true", commitment_timeout="3"))
        node.start()
        files = make_ct_series(tmp_path / "ct", 3, seed=8)
        uids = [read_sop_uid(f) for f in files]
        assert storescu(node.port, files).returncode == 0
        node.wait_delivered(3)
        ((transaction,),) = node.query("select distinct commitment_uid from delivery")
        assert node.query("select distinct commitment from delivery") == [("requested",)]

        report = Dataset()
        report.TransactionUID = transaction
        ok = Dataset()
        ok.ReferencedSOPClassUID, ok.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uids[0]
        bad = Dataset()
        bad.ReferencedSOPClassUID, bad.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uids[1]
        bad.FailureReason = 0x0112
        report.ReferencedSOPSequence = [ok]
        report.FailedSOPSequence = [bad]
        ae = AE("ORTHANC")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(
            "127.0.0.1",
            node.port,
            ae_title=node.ae_title,
            ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
        )
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(report, 2, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
        assoc.release()
        assert status.Status == 0x0000

        state = dict(
            (u, (s, c, a))
            for u, s, c, a in node.query("select sop_instance_uid, state, commitment, attempts from delivery")
        )
        assert state[uids[0]] == ("delivered", "committed", 1)
        # the failed one is sent (and committed) again at once; the unanswered one after commitment_timeout
        wait_for(
            lambda: node.query("select attempts from delivery where sop_instance_uid = ?", uids[1]) == [(2,)],
            20,
            "the instance the PACS did not commit to be sent again",
        )
        wait_for(
            lambda: node.query("select attempts from delivery where sop_instance_uid = ?", uids[2])[0][0] >= 2,
            30,
            "the unanswered instance to be sent again",
        )
        assert "reported failed; sending them again" in node.log()
        assert "never confirmed by storage commitment" in node.log()
        assert node.query("select commitment from delivery where sop_instance_uid = ?", uids[0]) == [("committed",)]
    finally:
        pacs.stop()


def test_volume_results_reach_orthanc_as_a_derived_series_and_a_parametric_map(node, orthanc):
    orthanc.start()
    node.extra_config = f"""
[tracker]
stable_after = 1
{orthanc.destination("pacs")}
[[rules]]
name = "volumes"
match = {{ Modality = "CT" }}
[[rules.actions]]
type = "plugin"
plugin = "smooth-series"
send_to = ["pacs"]
series_description = "smoothed (AI)"
[[rules.actions]]
type = "plugin"
plugins = [{{ name = "threshold-seg" }}, {{ name = "distance-map" }}]
send_to = ["pacs"]
"""
    node.start()
    files = series_files(CT)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: node.query("select count(*) from job where state = 'succeeded'") == [(2,)], 120, "two jobs")
    results = [r for (r,) in node.query("select result from job order by id")]
    assert "28 image from 28 source instances" in results[0] and "stored exactly" in results[0], results[0]
    assert "1 SEG, 1 parametric map" in results[1], results[1]
    node.wait_delivered(28 + 2)
    assert orthanc.count() == 28 + 2
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    series = orthanc.get("/series?expand")
    by_desc = {s["MainDicomTags"].get("SeriesDescription"): s for s in series}
    smoothed = by_desc["smoothed (AI)"]
    assert len(smoothed["Instances"]) == 28 and smoothed["MainDicomTags"]["Modality"] == "CT"
    sop_classes = {orthanc.get(f"/instances/{i}/metadata/SopClassUid").decode() for s in series for i in s["Instances"]}
    assert {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.30"} <= sop_classes
    assert all(s["ParentStudy"] == series[0]["ParentStudy"] for s in series), "all in the source's study"
    assert (
        source.StudyInstanceUID
        == orthanc.get(f"/studies/{series[0]['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
    )
