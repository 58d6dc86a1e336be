"""A ``type = "dicomweb"`` destination: a rule forwards through the durable queue by STOW-RS to a real Orthanc with
its DICOMweb plugin (``orthanc-dicomweb``), which requires HTTP basic authentication.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from helpers import NodeProcess, make_ct_series, read_sop_uid, series_files, storescu, wait_for
from helpers.orthanc import Orthanc

CT = "ct-head-philips-5mm"  # 28 real axial CT images
USERS = {"node": "s3cret-pw"}


@pytest.fixture
def orthanc(tmp_path: Path):
    server = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)
    yield server
    server.stop()


def forward_to(destination: str) -> str:
    """Config: a series is stable 1 s after its last instance; one rule forwards every series to ``pacs``."""
    return (
        f'[tracker]\nstable_after = 1\nuse_expected_counts = false\n{destination}\n[[rules]]\nname = "route"\n'
        'actions = [{ type = "forward", to = ["pacs"] }]\n'
    )


def dataset_bytes(raw: bytes) -> bytes:
    """A Part 10 file's data set, after its File Meta (preamble, "DICM", then group 0002 of the length it gives)."""
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def deliveries(node) -> list[tuple]:  # type: ignore[no-untyped-def]
    return node.query(
        "select sop_instance_uid, state, attempts, last_error from delivery where destination = 'pacs' order by id"
    )


def queue_cli(node, *args: str) -> str:  # type: ignore[no-untyped-def]
    r = subprocess.run(
        [sys.executable, "-m", "node", "queue", *args, "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_a_rule_delivers_each_instance_once_with_its_data_set_unchanged(node, orthanc):
    orthanc.start()
    user, password = next(iter(USERS.items()))
    node.extra_config = forward_to(orthanc.dicomweb_destination("pacs", username=f'"{user}"', password=f'"{password}"'))
    node.start()
    files = series_files(CT)
    assert storescu(node.port, files).returncode == 0
    node.wait_delivered(len(files))
    assert orthanc.count() == len(files)
    assert orthanc.new_instance_events() == len(files), "each instance stored once"
    stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in node.stored_files()}
    for f in files:
        uid = read_sop_uid(f)
        assert dataset_bytes(orthanc.file(uid)) == dataset_bytes(stored[uid].read_bytes()), uid
        assert pydicom.dcmread(stored[uid]) == pydicom.dcmread(f), "the node stored what it received"
    rows = deliveries(node)
    assert {r[1] for r in rows} == {"delivered"} and {r[2] for r in rows} == {1}
    # dicom-node queue shows the destination like a DIMSE one
    table = " ".join(queue_cli(node).split())
    assert re.search(rf"pacs │ 0 │ 0 │ {len(files)} │ 0 │ 0", table), table
    assert "instance(s) delivered" in node.log()
    audited = node.query("select count(*) from audit_event where kind = 'delivered' and destination = 'pacs'")
    assert audited == [(len(files),)], "each delivery is in the audit trail"


def test_wrong_credentials_fail_each_delivery_once_with_the_reason_then_retry_delivers(node, orthanc, tmp_path):
    orthanc.start()
    retry = "{ initial_delay = 0.5, max_delay = 2 }"
    wrong = orthanc.dicomweb_destination("pacs", username='"node"', password='"wrong"', retry=retry)
    node.extra_config = forward_to(wrong)
    node.start()
    first = make_ct_series(tmp_path / "a", 12, seed=1)
    assert storescu(node.port, first).returncode == 0
    wait_for(lambda: node.deliveries() == {"failed": 12}, 30, "every delivery to fail")
    # the destination is not wedged: a later series is tried at once, and fails the same way
    second = make_ct_series(tmp_path / "b", 5, seed=2)
    assert storescu(node.port, second).returncode == 0
    wait_for(lambda: node.deliveries() == {"failed": 17}, 30, "the later series to be tried too")
    rows = deliveries(node)
    assert {r[2] for r in rows} == {1}, "failed once, not retried"
    reason = "HTTP 401 Unauthorized: check the token or username/password of [[destinations]] 'pacs'"
    assert all(reason in r[3] for r in rows), rows[0][3]
    assert orthanc.count() == 0
    assert "consecutive failure" not in node.log(), "a refusal is not an outage: no back-off"
    assert reason in node.log()
    audited = node.query("select detail from audit_event where kind = 'delivery_failed' and destination = 'pacs'")
    assert len(audited) == 17 and all(reason in d for (d,) in audited)
    # the administrator fixes the password and sends the failed ones again
    node.stop()
    node.extra_config = forward_to(
        orthanc.dicomweb_destination("pacs", username='"node"', password=f'"{USERS["node"]}"', retry=retry)
    )
    node.start()
    assert "17 failed or cancelled deliveries queued again" in queue_cli(node, "retry", "--destination", "pacs")
    node.wait_delivered(17)
    assert orthanc.count() == 17 and orthanc.new_instance_events() == 17
    assert {orthanc.tags(read_sop_uid(f))["SOPInstanceUID"] for f in first + second} == {
        read_sop_uid(f) for f in first + second
    }


def test_orthanc_down_then_up_is_retried_with_backoff_and_delivered_once(node, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)  # ports picked, not started yet
    retry = "{ initial_delay = 0.5, max_delay = 2, multiplier = 2, jitter = 0.1 }"
    node.extra_config = forward_to(
        orthanc.dicomweb_destination("pacs", username='"node"', password=f'"{USERS["node"]}"', retry=retry)
    )
    node.start()
    try:
        files = make_ct_series(tmp_path / "ct", 20, seed=3)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: node.log().count("consecutive failure(s), next try in") >= 3, 30, "three failed tries")
        waiting = node.deliveries()
        assert set(waiting) <= {"queued", "sending"} and sum(waiting.values()) == 20, waiting  # "sending": a probe
        assert "cannot reach pacs (" in node.log() and "Connection refused" in node.log()
        orthanc.start()
        node.wait_delivered(20, timeout=30)
        assert orthanc.count() == 20 and orthanc.new_instance_events() == 20, "each instance stored once"
        rows = deliveries(node)
        assert min(r[2] for r in rows) >= 3, "tried during the outage, then delivered"
        assert "delivering again; circuit closed" in node.log()
    finally:
        orthanc.stop()


def test_one_node_forwards_to_another_nodes_dicomweb_server_with_its_bearer_token(node, tmp_path):
    """Node to node over DICOMweb: the first forwards by STOW-RS to the second's /dicom-web with a bearer token."""
    token = "node-to-node-token-0123456789"
    other = NodeProcess(tmp_path / "other", extra_config=f'[web]\ntoken = "{token}"\n')
    other.start()
    try:
        url = f"http://127.0.0.1:{other.web_port}/dicom-web"
        node.extra_config = forward_to(
            f'[[destinations]]\nname = "pacs"\ntype = "dicomweb"\nurl = "{url}"\ntoken = "{token}"\n'
            f'[[destinations]]\nname = "stranger"\ntype = "dicomweb"\nurl = "{url}"\ntoken = "not-{token}"\n'
        ).replace('to = ["pacs"]', 'to = ["pacs", "stranger"]')
        node.start()
        files = series_files(CT)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: node.deliveries() == {"delivered": 28, "failed": 28}, 60, "28 delivered, 28 refused")
        received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in other.stored_files()}
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in node.stored_files()}
        assert set(received) == set(sent) == {read_sop_uid(f) for f in files}
        for uid, p in sent.items():
            assert dataset_bytes(received[uid].read_bytes()) == dataset_bytes(p.read_bytes()), uid
        refused = node.query("select distinct last_error from delivery where destination = 'stranger'")
        assert len(refused) == 1 and "HTTP 401" in refused[0][0] and "[[destinations]] 'stranger'" in refused[0][0]
    finally:
        other.stop()
    assert "Traceback" not in other.log(), other.log()[-4000:]
